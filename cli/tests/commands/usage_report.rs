//! `xpart usage` over audit files as the daemons and logrotate leave them: the live file, a
//! numbered rotation and a dated, gzip-compressed one.

use std::io::Write;

use crate::support::{xpart, Scratch};

#[test]
fn totals_and_costs_per_principal_over_plain_rotated_and_gzip_files() {
    let dir = fixture();
    let prices = dir.write("prices.toml", PRICES);
    let run = xpart(&[
        "usage",
        &dir.arg("logs"),
        "--by",
        "principal",
        "--prices",
        &prices.display().to_string(),
        "--json",
    ])
    .ok();
    assert_eq!(run.stderr, "", "no warning expected");
    let report = run.json();
    assert_eq!(report["records"], 5);
    let rows = report["rows"].as_array().unwrap();
    let names: Vec<&str> = rows
        .iter()
        .map(|r| r["principal"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["-", "batch", "summarizer"]);
    let summarizer = &rows[2];
    assert_eq!(summarizer["requests"], 3);
    assert_eq!(summarizer["errors"], 1);
    assert_eq!(summarizer["refusals"], 1);
    assert_eq!(summarizer["input_tokens"], 3000);
    assert_eq!(summarizer["output_tokens"], 400);
    assert_eq!(summarizer["cache_read_tokens"], 2000);
    // 3,000 in at 0.25/M, 400 out at 1.25/M, 2,000 cache read charged as input.
    assert_close(&summarizer["cost"], 0.00075 + 0.0005 + 0.0005);
    let batch = &rows[1];
    assert_eq!(batch["requests"], 1);
    assert_eq!(batch["input_tokens"], 10_000);
    assert_eq!(batch["output_tokens"], 1000);
    assert_close(&batch["cost"], 0.03 + 0.015);
    let anonymous = &rows[0];
    assert_eq!(anonymous["refusals"], 1);
    assert_eq!(anonymous["cost"], 0.0);
    let total = &report["total"];
    assert_eq!(total["requests"], 5);
    assert_eq!(total["errors"], 3);
    assert_eq!(total["refusals"], 2);
    assert_close(&total["cost"], 0.00175 + 0.045);
}

#[test]
fn csv_and_table_group_by_model_and_day() {
    let dir = fixture();
    let csv = xpart(&["usage", &dir.arg("logs"), "--by", "day,model", "--csv"])
        .ok()
        .stdout;
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(
        lines[0],
        "day,model,requests,errors,refusals,input_tokens,output_tokens,\
         cache_read_tokens,cache_write_tokens"
    );
    assert_eq!(
        lines[1],
        "2025-06-01,anthropic.claude-3-haiku-20240307-v1:0,2,0,0,3000,400,2000,0"
    );
    assert_eq!(lines.last().unwrap(), &"TOTAL,,5,3,2,13000,1400,2000,0");
    assert_eq!(lines.len(), 5, "{csv}");

    let table = xpart(&["usage", &dir.arg("logs"), "--by", "principal"])
        .ok()
        .stdout;
    let header = table.lines().next().unwrap();
    assert!(header.starts_with("PRINCIPAL"), "{table}");
    assert!(
        header.contains("REQUESTS") && header.contains("INPUT_TOKENS"),
        "{table}"
    );
    assert!(
        !header.contains("COST"),
        "no cost without --prices: {table}"
    );
    let last = table.lines().last().unwrap();
    assert!(last.starts_with("TOTAL"), "{table}");
    assert!(last.contains(" 13000 "), "{table}");
}

#[test]
fn the_window_keeps_only_requests_inside_it() {
    let dir = fixture();
    let run = xpart(&[
        "usage",
        &dir.arg("logs"),
        "--since",
        "2025-06-02",
        "--until",
        "2025-06-02",
        "--by",
        "day",
        "--json",
    ])
    .ok();
    let report = run.json();
    assert_eq!(report["total"]["requests"], 3);
    assert_eq!(report["rows"][0]["day"], "2025-06-02");
    assert_eq!(report["since"], "2025-06-02T00:00:00Z");
    assert_eq!(report["until"], "2025-06-03T00:00:00Z");

    let swapped = xpart(&[
        "usage",
        &dir.arg("logs"),
        "--since",
        "2025-06-03",
        "--until",
        "2025-06-01",
    ])
    .fails_with(2);
    assert!(swapped.stderr.contains("--since"), "{}", swapped.stderr);
    xpart(&["usage", &dir.arg("logs"), "--since", "yesterday"]).fails_with(2);
}

#[test]
fn bad_lines_and_missing_files_are_reported_with_file_and_line_and_skipped() {
    let dir = fixture();
    let broken = dir.write(
        "broken.jsonl",
        &format!("{SUMMARIZER_DAY1}\nnot json\n{SUMMARIZER_DAY1}\n{{\"time\":\"2025-06"),
    );
    let missing = dir.arg("logs/audit.jsonl.7");
    let run = xpart(&[
        "usage",
        &broken.display().to_string(),
        &missing,
        "--by",
        "principal",
        "--json",
    ])
    .ok();
    let name = broken.display();
    assert!(
        run.stderr
            .contains(&format!("{name}:2: not an audit record")),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains(&format!("{name}:4: truncated line")),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains(&format!("{missing}: No such file")),
        "{}",
        run.stderr
    );
    let report = run.json();
    assert_eq!(report["total"]["requests"], 2);
    assert_eq!(report["warnings"].as_array().unwrap().len(), 3);
}

#[test]
fn nothing_readable_at_all_is_an_input_error() {
    let dir = Scratch::new();
    let junk = dir.write("junk.jsonl", "not an audit line\n");
    let run = xpart(&[
        "usage",
        &dir.arg("nowhere.jsonl"),
        &junk.display().to_string(),
    ])
    .fails_with(2);
    assert!(
        run.stderr.contains("no audit record could be read"),
        "{}",
        run.stderr
    );
    xpart(&["usage", &dir.arg("logs"), "--json", "--csv"]).fails_with(2);
}

#[test]
fn agent_and_relay_lines_together_draw_a_warning_and_service_picks_one() {
    let dir = fixture();
    let relay = format!(
        r#"{{"time":"2025-06-01T09:00:00.010Z","service":"relay","request_id":"r1","principal":"summarizer","source":null,"operation":"Converse","model":"{HAIKU}","relay":null,"status":200,"error_type":null,"message":null,"latency_ms":3.0,"upstream_latency_ms":2.0,"bytes_in":10,"bytes_out":20}}"#
    );
    dir.write("logs/relay-audit.jsonl", &format!("{relay}\n"));
    let both = xpart(&["usage", &dir.arg("logs"), "--json"]).ok();
    assert!(both.stderr.contains("counted twice"), "{}", both.stderr);
    assert_eq!(both.json()["total"]["requests"], 6);
    let agent = xpart(&["usage", &dir.arg("logs"), "--service", "agent", "--json"]).ok();
    assert_eq!(agent.stderr, "");
    assert_eq!(agent.json()["total"]["requests"], 5);
    let relay_only = xpart(&["usage", &dir.arg("logs"), "--service", "relay", "--json"]).ok();
    assert_eq!(relay_only.json()["total"]["requests"], 1);
}

const HAIKU: &str = "anthropic.claude-3-haiku-20240307-v1:0";

const SUMMARIZER_DAY1: &str = r#"{"time":"2025-06-01T09:00:00.000Z","service":"agent","request_id":"a1","principal":"summarizer","source":"10.0.16.5","operation":"Converse","model":"anthropic.claude-3-haiku-20240307-v1:0","relay":"relay-a","status":200,"error_type":null,"message":null,"latency_ms":812.5,"upstream_latency_ms":790.1,"bytes_in":300,"bytes_out":900,"input_tokens":1000,"output_tokens":100,"cache_read_tokens":2000,"cache_write_tokens":0}"#;

const PRICES: &str = r#"currency = "USD"
[models."*anthropic.claude-3-haiku-*"]
input_per_1k = 0.00025
output_per_1k = 0.00125

[models."*anthropic.claude-3-5-sonnet-*"]
input_per_1k = 0.003
output_per_1k = 0.015
"#;

/// Five agent lines: two in a dated gzip rotation, one in `audit.jsonl.1`, two in the live
/// file; one refusal without a principal, one refused by the limiter, one Bedrock error.
fn fixture() -> Scratch {
    let dir = Scratch::new();
    std::fs::create_dir_all(dir.path("logs")).expect("create the logs directory");
    let day1 = format!(
        "{SUMMARIZER_DAY1}\n{}\n",
        r#"{"time":"2025-06-01T10:00:00.000Z","service":"agent","request_id":"a2","principal":"summarizer","source":"10.0.16.5","operation":"ConverseStream","model":"anthropic.claude-3-haiku-20240307-v1:0","relay":"relay-b","status":200,"error_type":null,"message":null,"latency_ms":1500.0,"upstream_latency_ms":1400.0,"bytes_in":300,"bytes_out":4000,"input_tokens":2000,"output_tokens":300}"#
    );
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(day1.as_bytes()).expect("gzip into memory");
    std::fs::write(
        dir.path("logs/audit.jsonl-20250601-1748736000.gz"),
        gz.finish().expect("gzip into memory"),
    )
    .expect("write the gzip rotation");
    dir.write(
        "logs/audit.jsonl.1",
        concat!(
            r#"{"time":"2025-06-02T00:00:00.000Z","service":"agent","request_id":"a3","principal":"summarizer","source":"10.0.16.5","operation":"Converse","model":"anthropic.claude-3-haiku-20240307-v1:0","relay":null,"status":429,"error_type":"ThrottlingException","message":"principal summarizer exceeded 50 requests per second","latency_ms":0.1,"upstream_latency_ms":null,"bytes_in":0,"bytes_out":0}"#,
            "\n"
        ),
    );
    dir.write(
        "logs/audit.jsonl",
        concat!(
            r#"{"time":"2025-06-02T08:00:00.000Z","service":"agent","request_id":"a4","principal":null,"source":"10.0.99.1","operation":"Converse","model":"anthropic.claude-3-5-sonnet-20240620-v1:0","relay":null,"status":403,"error_type":"AccessDeniedException","message":"no valid token","latency_ms":0.1,"upstream_latency_ms":null,"bytes_in":0,"bytes_out":0}"#,
            "\n",
            r#"{"time":"2025-06-02T12:00:00.000Z","service":"agent","request_id":"a5","principal":"batch","source":"10.0.16.9","operation":"Converse","model":"anthropic.claude-3-5-sonnet-20240620-v1:0","relay":"relay-a","status":503,"error_type":"ServiceUnavailableException","message":null,"latency_ms":900.0,"upstream_latency_ms":880.0,"bytes_in":500,"bytes_out":100,"input_tokens":10000,"output_tokens":1000}"#,
            "\n"
        ),
    );
    dir.write("logs/README", "not an audit file; not read\n");
    dir
}

#[track_caller]
fn assert_close(actual: &serde_json::Value, expected: f64) {
    let actual = actual
        .as_f64()
        .unwrap_or_else(|| panic!("expected a number, got {actual}"));
    assert!((actual - expected).abs() < 1e-9, "{actual} != {expected}");
}
