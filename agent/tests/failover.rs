//! Relay failover and balancing: overlapping requests spread over the relays of the best
//! group; traffic moves off a relay within 3 s of it dying, and within a second of it
//! vanishing without a word (its HTTP/2 connection stops answering PINGs); requests in
//! flight on a dead relay end promptly with a 503, never hang.

mod fixture;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fixture::*;
use tokio::task::JoinHandle;
use xpart_agent::AgentHandle;

const CONVERSE: &str = "/model/anthropic.claude-3-haiku-20240307-v1%3A0/converse";

fn relay_of(answer: &Answer) -> String {
    let value: serde_json::Value = serde_json::from_slice(&answer.body).unwrap_or_default();
    value["relay"].as_str().unwrap_or("").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_primary_under_load_moves_traffic_within_three_seconds() {
    let (scratch, [a, _b], agent) = agent_with_healthy_relays("failover-kill").await;
    let _probe = caller_served_by_primary(&scratch, &agent).await;

    let load = Load::start(&scratch, agent.front_addr(), 4, Duration::from_secs(5));
    tokio::time::sleep(Duration::from_millis(800)).await;
    a.kill();
    let killed = load.elapsed();

    let calls = load.calls().await;
    calls.iter().for_each(assert_answered_or_unavailable);
    let failed = calls.iter().filter(|c| c.status != 200).count();
    let recovered: Vec<&Call> = calls
        .iter()
        .filter(|c| c.ended() > killed + Duration::from_secs(3))
        .collect();
    assert!(!recovered.is_empty(), "requests kept flowing");
    assert!(
        recovered
            .iter()
            .all(|c| c.status == 200 && c.relay == "relay-b"),
        "3 s after the kill every request succeeds through relay-b"
    );
    assert!(failed < calls.len(), "no request succeeded");
    eprintln!(
        "failover: {} requests, {} succeeded, {} failed with 503",
        calls.len(),
        calls.len() - failed,
        failed
    );
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_in_flight_on_a_silent_relay_ends_with_503_promptly() {
    let (scratch, [a, _b], agent) = agent_with_healthy_relays("failover-silent").await;

    // relay-a keeps its connections open but answers nothing: a tunnel gone quiet.
    a.set(Behaviour::Silent);
    let start = Instant::now();
    let mut caller = Caller::connect(&scratch, agent.front_addr(), false).await;
    let answer = caller.post(CONVERSE, Some(TOKEN), b"{}").await;
    let took = start.elapsed();
    assert_eq!(answer.status, 503, "body: {:?}", answer.body);
    assert_eq!(answer.error_type(), "ServiceUnavailableException");
    assert!(
        answer.message().contains("relay-a stopped answering"),
        "{}",
        answer.message()
    );
    assert!(took < Duration::from_secs(4), "ended after {took:?}");

    let next = caller.post(CONVERSE, Some(TOKEN), b"{}").await;
    assert_eq!(next.status, 200);
    assert_eq!(relay_of(&next), "relay-b");

    // relay-a recovers and takes traffic back after two good probes.
    a.set(Behaviour::Serve);
    let deadline = Instant::now() + Duration::from_secs(6);
    loop {
        let answer = caller.post(CONVERSE, Some(TOKEN), b"{}").await;
        if relay_of(&answer) == "relay-a" {
            break;
        }
        assert!(Instant::now() < deadline, "relay-a never came back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    agent.shutdown().await;
    let audit = audit_lines(&scratch);
    assert!(audit
        .iter()
        .any(|l| l["status"] == 503 && l["relay"] == "relay-a"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_lost_in_the_middle_of_an_answer_is_a_503_not_a_truncated_200() {
    let (scratch, [a, _b], agent) = agent_with_healthy_relays("failover-partial").await;

    let mut caller = Caller::connect(&scratch, agent.front_addr(), false).await;
    let request = caller.post(
        "/model/anthropic.claude-partial/converse",
        Some(TOKEN),
        b"{}",
    );
    let silence = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        a.set(Behaviour::Silent);
    };
    let start = Instant::now();
    let (answer, ()) = tokio::join!(request, silence);
    assert_eq!(answer.status, 503, "body: {:?}", answer.body);
    assert_eq!(answer.error_type(), "ServiceUnavailableException");
    assert!(start.elapsed() < Duration::from_secs(4));
    agent.shutdown().await;
}

#[tokio::test]
async fn no_healthy_relay_is_a_prompt_503() {
    let scratch = Scratch::new("failover-none");
    let a = FakeRelay::start("relay-a").await;
    a.set(Behaviour::Drained);
    let agent = start_agent(&scratch, &agent_toml(&scratch, &[&a], &token_principal(""))).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut caller = Caller::connect(&scratch, agent.front_addr(), false).await;
    let start = Instant::now();
    let answer = caller.post(CONVERSE, Some(TOKEN), b"{}").await;
    assert_eq!(answer.status, 503);
    assert_eq!(answer.error_type(), "ServiceUnavailableException");
    assert!(answer.message().contains("request was not sent"));
    assert!(start.elapsed() < Duration::from_millis(500));
    assert!(a.seen().is_empty());
    agent.shutdown().await;
}

/// Takes over `port` on loopback with a listener that never accepts and whose accept queue
/// is full, so further connection attempts get no answer at all (their SYNs are dropped),
/// like a relay whose tunnel went quiet. Returns what must stay alive for that to last.
async fn blackhole(port: u16) -> (tokio::net::TcpListener, Vec<tokio::net::TcpStream>) {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + Duration::from_secs(2);
    let listener = loop {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_reuseaddr(true).expect("reuseaddr");
        match socket.bind(addr).and_then(|()| socket.listen(0)) {
            Ok(listener) => break listener,
            // The killed relay's listener may not be closed yet.
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(error) => panic!("cannot take over {addr}: {error}"),
        }
    };
    let mut filler = Vec::new();
    loop {
        match tokio::time::timeout(
            Duration::from_millis(300),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            Ok(Ok(stream)) => filler.push(stream),
            Ok(Err(error)) => panic!("filling {addr}: {error}"),
            Err(_) => break,
        }
        assert!(filler.len() < 64, "the accept queue of {addr} never filled");
    }
    (listener, filler)
}

/// The relay's process dies and its address then swallows connection attempts: many
/// requests arriving together share one connect attempt and end together, with a 503 within
/// the connect timeout or an answer from the next relay, rather than queueing for a connect
/// attempt each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_to_an_unreachable_relay_do_not_queue_for_connects() {
    let (scratch, [a, _b], agent) = agent_with_healthy_relays("failover-blackhole").await;
    let mut first = caller_served_by_primary(&scratch, &agent).await;

    a.kill();
    let _hole = blackhole(a.addr.port()).await;
    let front = agent.front_addr();
    let start = Instant::now();
    let mut requests = Vec::new();
    for _ in 0..24 {
        let scratch = scratch.clone();
        requests.push(tokio::spawn(async move {
            let mut caller = Caller::connect(&scratch, front, false).await;
            let answer = caller.post(CONVERSE, Some(TOKEN), b"{}").await;
            (start.elapsed(), answer)
        }));
    }
    let mut moved = 0;
    for request in requests {
        let (took, answer) = request.await.expect("request task");
        // Default connect timeout 2 s, plus the time to reach the next relay.
        assert!(took < Duration::from_secs(4), "answered after {took:?}");
        match answer.status {
            200 => {
                assert_eq!(relay_of(&answer), "relay-b");
                moved += 1;
            }
            503 => assert_eq!(answer.error_type(), "ServiceUnavailableException"),
            other => panic!("unexpected status {other}: {:?}", answer.body),
        }
    }
    assert!(moved > 0, "no request moved to relay-b");
    // Later requests go straight to relay-b.
    let next = first.post(CONVERSE, Some(TOKEN), b"{}").await;
    assert_eq!(next.status, 200);
    assert_eq!(relay_of(&next), "relay-b");
    agent.shutdown().await;
}

/// A caller whose first request relay-a answered: one request at a time goes to the first
/// relay of the group.
async fn caller_served_by_primary(scratch: &Scratch, agent: &AgentHandle) -> Caller {
    let mut caller = Caller::connect(scratch, agent.front_addr(), false).await;
    let answer = caller.post(CONVERSE, Some(TOKEN), b"{}").await;
    assert_eq!(relay_of(&answer), "relay-a");
    caller
}

/// An agent in front of `N` fake relays of one group, once every one of them is healthy.
async fn agent_with_healthy_relays<const N: usize>(
    test: &str,
) -> (Arc<Scratch>, [FakeRelay; N], AgentHandle) {
    let scratch = Arc::new(Scratch::new(test));
    let relays = fake_relays::<N>().await;
    let toml = agent_toml(
        &scratch,
        &relays.iter().collect::<Vec<_>>(),
        &token_principal(""),
    );
    let agent = start_healthy(&scratch, &toml, N).await;
    (scratch, relays, agent)
}

/// `relay-a`, `relay-b`, … up to `relay-c`.
async fn fake_relays<const N: usize>() -> [FakeRelay; N] {
    let mut relays = Vec::with_capacity(N);
    for name in ["relay-a", "relay-b", "relay-c"].into_iter().take(N) {
        relays.push(FakeRelay::start(name).await);
    }
    let Ok(relays) = relays.try_into() else {
        panic!("the tests name at most three relays, not {N}");
    };
    relays
}

/// Starts the agent and waits until `relays` relays are healthy.
async fn start_healthy(scratch: &Scratch, toml: &str, relays: usize) -> AgentHandle {
    let agent = start_agent(scratch, toml).await;
    wait_all_healthy(&agent, relays).await;
    agent
}

const HANG: &str = "/model/anthropic.claude-hang/converse";

/// Six requests that the relays never answer, held open together: two on each of three
/// relays of one group, counted on `/status` and in `xpart_agent_relay_outstanding` until the
/// callers go away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_requests_spread_over_every_relay_and_count_until_they_end() {
    let (scratch, relays, agent) = agent_with_healthy_relays::<3>("balance-spread").await;

    let held = hold(&scratch, agent.front_addr(), 6).await;
    let outstanding = wait_for_outstanding(&agent, &[2, 2, 2]).await;
    assert_eq!(outstanding, [2, 2, 2]);
    let metrics = admin_get(agent.admin_addr(), "/metrics").await.1;
    for relay in ["relay-a", "relay-b", "relay-c"] {
        assert!(
            metrics.contains(&format!(
                "xpart_agent_relay_outstanding{{relay=\"{relay}\"}} 2"
            )),
            "{metrics}"
        );
    }
    for relay in &relays {
        assert_eq!(
            relay.seen().len(),
            2,
            "{} saw {:?}",
            relay.name,
            relay.seen()
        );
    }

    // Callers that go away give their relays' counts back.
    for caller in held {
        caller.abort();
    }
    assert_eq!(wait_for_outstanding(&agent, &[0, 0, 0]).await, [0, 0, 0]);
    agent.shutdown().await;
}

/// relay-a and relay-b form the preferred group (priority 0, weights 1 and 2); relay-c
/// (priority 1) takes requests only once neither of them can.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lower_priority_group_waits_until_the_preferred_one_is_down() {
    let scratch = Arc::new(Scratch::new("balance-groups"));
    let [a, b, c] = fake_relays().await;
    let toml = agent_toml(&scratch, &[&a, &b, &c], &token_principal(""));
    let toml = with_relay_fields(&toml, &b, "weight = 2\n");
    let toml = with_relay_fields(&toml, &c, "priority = 1\n");
    let agent = start_healthy(&scratch, &toml, 3).await;

    let held = hold(&scratch, agent.front_addr(), 6).await;
    assert_eq!(wait_for_outstanding(&agent, &[2, 4, 0]).await, [2, 4, 0]);
    let status = status(&agent).await;
    assert_eq!(
        status["active_relays"],
        serde_json::json!(["relay-a", "relay-b"])
    );
    assert_eq!(status["relays"][2]["priority"], 1);
    assert_eq!(status["relays"][1]["weight"], 2);
    for caller in held {
        caller.abort();
    }

    a.kill();
    b.kill();
    let mut caller = Caller::connect(&scratch, agent.front_addr(), false).await;
    let deadline = Instant::now() + Duration::from_secs(3);
    let answer = loop {
        let answer = caller.post(CONVERSE, Some(TOKEN), b"{}").await;
        if answer.status == 200 || Instant::now() > deadline {
            break answer;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert_eq!(relay_of(&answer), "relay-c");
    agent.shutdown().await;
}

/// Sends `count` requests that the relays never answer, one at a time, so that each sees the
/// ones before it counted. They stay open until aborted.
async fn hold(scratch: &Arc<Scratch>, front: SocketAddr, count: usize) -> Vec<JoinHandle<Answer>> {
    let mut held = Vec::new();
    for _ in 0..count {
        let scratch = scratch.clone();
        held.push(tokio::spawn(async move {
            let mut caller = Caller::connect(&scratch, front, false).await;
            caller.post(HANG, Some(TOKEN), b"{}").await
        }));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    held
}

/// relay-a freezes under load: its host stops answering anything, without closing a
/// connection (no FIN, no RST), as a frozen, powered-off or cut-off host does. It misses a
/// probe and, suspect, takes no new request well within a second; from 1 s after the freeze
/// every request succeeds at once on relay-b or relay-c. The requests it held end with a 503
/// when its silence outlasts the hard deadline (`fail_after` probes or the PING deadline,
/// about 2 s), and every request is accounted for (an answer or a 503, none silent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_relay_under_load_is_out_within_a_second() {
    let scratch = Arc::new(Scratch::new("balance-frozen"));
    let [a, b, c] = fake_relays().await;
    let freezer = Freezer::start(a.addr).await;
    let toml = agent_toml(&scratch, &[&a, &b, &c], &token_principal(""));
    let agent = start_healthy(&scratch, &served_at(&toml, &a, freezer.addr), 3).await;

    let load = Load::start(&scratch, agent.front_addr(), 6, Duration::from_millis(4500));
    tokio::time::sleep(Duration::from_millis(1000)).await;
    freezer.freeze();
    let frozen = load.elapsed();

    let calls = load.calls().await;
    let before: Vec<&Call> = calls.iter().filter(|c| c.ended() < frozen).collect();
    for relay in ["relay-a", "relay-b", "relay-c"] {
        assert!(
            before.iter().any(|c| c.relay == relay),
            "{relay} took no request before the freeze"
        );
    }
    for call in &calls {
        assert_answered_or_unavailable(call);
        // Sent up to 750 ms after the freeze, ended by the 2 s hard deadline, with room for a
        // loaded machine.
        assert!(
            call.took < Duration::from_millis(3200),
            "a call hung: {call:?}"
        );
    }
    let settled = frozen + Duration::from_secs(1);
    let after: Vec<&Call> = calls.iter().filter(|c| c.sent >= settled).collect();
    assert!(after.len() > 20, "load went on: {} calls", after.len());
    for call in &after {
        assert_eq!(call.status, 200, "failed 1 s after the freeze: {call:?}");
        assert_ne!(call.relay, "relay-a", "{call:?}");
        assert!(
            call.took < Duration::from_millis(300),
            "waited 1 s after the freeze: {call:?}"
        );
    }
    let failed = calls.iter().filter(|c| c.status != 200).count();
    let last_failure = calls
        .iter()
        .filter(|c| c.status != 200)
        .map(|c| c.ended() - frozen)
        .max();
    eprintln!(
        "frozen relay: {} calls, {} failed with 503, last failure answered {:?} after the freeze",
        calls.len(),
        failed,
        last_failure
    );
    assert!(
        calls.iter().any(|c| c.relay.is_empty() && c.status == 503),
        "the requests relay-a held were ended with a 503"
    );
    let metrics = admin_get(agent.admin_addr(), "/metrics").await.1;
    assert!(metrics.contains("xpart_agent_relay_healthy{relay=\"relay-a\"} 0"));
    agent.shutdown().await;
}

/// relay-a stalls under load for 1.2 s and then delivers everything it held, as a healthy
/// relay behind a lossy link does when a segment needs a retransmission or two. The requests
/// it was serving finish with a 200: a missed probe only makes it suspect, and the stall is
/// shorter than the PING deadline. New requests go to relay-b meanwhile, and relay-a takes
/// requests again once it answers a probe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_stalls_briefly_keeps_the_requests_in_flight_there() {
    let scratch = Arc::new(Scratch::new("balance-stall"));
    let [a, b] = fake_relays().await;
    let freezer = Freezer::start(a.addr).await;
    let toml = agent_toml(&scratch, &[&a, &b], &token_principal(""));
    let agent = start_healthy(&scratch, &served_at(&toml, &a, freezer.addr), 2).await;

    let load = Load::start(&scratch, agent.front_addr(), 4, Duration::from_millis(3500));
    tokio::time::sleep(Duration::from_millis(800)).await;
    freezer.stall();
    let stalled = load.elapsed();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    freezer.resume();
    let resumed = load.elapsed();

    let calls = load.calls().await;
    let failed: Vec<&Call> = calls.iter().filter(|c| c.status != 200).collect();
    assert!(failed.is_empty(), "a stall lost requests: {failed:?}");
    let held = calls
        .iter()
        .filter(|c| c.relay == "relay-a" && c.sent < stalled + Duration::from_millis(300))
        .filter(|c| c.ended() > resumed)
        .count();
    assert!(
        held > 0,
        "no request was in flight on relay-a through the stall"
    );
    let avoided: Vec<&Call> = calls
        .iter()
        .filter(|c| c.sent >= stalled + Duration::from_millis(800) && c.sent < resumed)
        .collect();
    assert!(!avoided.is_empty(), "load went on during the stall");
    for call in &avoided {
        assert_eq!(call.relay, "relay-b", "sent to the suspect relay: {call:?}");
    }
    assert!(
        calls
            .iter()
            .any(|c| c.relay == "relay-a" && c.sent > resumed + Duration::from_millis(500)),
        "relay-a never took requests again"
    );
    eprintln!(
        "stalled relay: {} calls, {} held through the stall, none failed",
        calls.len(),
        held
    );
    let metrics = admin_get(agent.admin_addr(), "/metrics").await.1;
    assert!(
        !metrics.contains(
            "xpart_agent_relay_ejections_total{reason=\"connection_lost\",relay=\"relay-a\"}"
        ),
        "{metrics}"
    );
    assert!(metrics.contains("xpart_agent_relay_healthy{relay=\"relay-a\"} 1"));
    agent.shutdown().await;
}

/// Callers that each post Converse requests back to back until `run_for` has passed,
/// recording every call.
struct Load {
    start: Instant,
    callers: Vec<JoinHandle<Vec<Call>>>,
}

impl Load {
    fn start(scratch: &Arc<Scratch>, front: SocketAddr, callers: usize, run_for: Duration) -> Load {
        let start = Instant::now();
        let callers = (0..callers)
            .map(|_| {
                let scratch = scratch.clone();
                tokio::spawn(async move {
                    let mut calls = Vec::new();
                    let mut caller = Caller::connect(&scratch, front, false).await;
                    while start.elapsed() < run_for {
                        let sent = start.elapsed();
                        let answer = caller.post(CONVERSE, Some(TOKEN), b"{}").await;
                        calls.push(Call {
                            sent,
                            took: start.elapsed() - sent,
                            status: answer.status,
                            error_type: answer.error_type().to_owned(),
                            relay: relay_of(&answer),
                        });
                        if answer.status != 200 {
                            // hyper keeps the HTTP/1.1 connection; pace failures a little.
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                    calls
                })
            })
            .collect();
        Load { start, callers }
    }

    /// Time since the load started.
    fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// Every caller's calls, once their time is up.
    async fn calls(self) -> Vec<Call> {
        let mut calls = Vec::new();
        for caller in self.callers {
            calls.extend(caller.await.expect("caller"));
        }
        calls
    }
}

/// One request of a [`Load`], its times counted from the start of the load.
#[derive(Debug)]
struct Call {
    sent: Duration,
    took: Duration,
    status: u16,
    error_type: String,
    relay: String,
}

impl Call {
    fn ended(&self) -> Duration {
        self.sent + self.took
    }
}

/// A request through a relay that fails is a 503 ServiceUnavailableException, nothing else.
fn assert_answered_or_unavailable(call: &Call) {
    match call.status {
        200 => {}
        503 => assert_eq!(call.error_type, "ServiceUnavailableException", "{call:?}"),
        _ => panic!("unexpected answer {call:?}"),
    }
}

/// Adds `fields` to the `[[relay]]` table of `relay` in `toml`.
fn with_relay_fields(toml: &str, relay: &FakeRelay, fields: &str) -> String {
    let port = service_port(relay.addr);
    assert!(toml.contains(&port));
    toml.replace(&port, &format!("{port}{fields}"))
}

/// Points the `[[relay]]` table of `relay` in `toml` at `stand_in` (on loopback too).
fn served_at(toml: &str, relay: &FakeRelay, stand_in: SocketAddr) -> String {
    let port = service_port(relay.addr);
    assert!(toml.contains(&port));
    toml.replace(&port, &service_port(stand_in))
}

fn service_port(addr: SocketAddr) -> String {
    format!("service_port = {}\n", addr.port())
}

async fn wait_all_healthy(agent: &AgentHandle, count: usize) {
    wait_ready(agent).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let status = status(agent).await;
        let healthy = status["relays"]
            .as_array()
            .map_or(0, |r| r.iter().filter(|r| r["state"] == "healthy").count());
        if healthy == count {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "relays never all healthy: {status}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Each relay's outstanding count on `/status`, once it equals `expected` (or after 3 s).
async fn wait_for_outstanding(agent: &AgentHandle, expected: &[u64]) -> Vec<u64> {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let counts: Vec<u64> = status(agent).await["relays"]
            .as_array()
            .map(|relays| {
                relays
                    .iter()
                    .map(|r| r["outstanding"].as_u64().unwrap_or(u64::MAX))
                    .collect()
            })
            .unwrap_or_default();
        if counts == expected || Instant::now() > deadline {
            return counts;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The agent's `/status` document.
async fn status(agent: &AgentHandle) -> serde_json::Value {
    let (_, status) = admin_get(agent.admin_addr(), "/status").await;
    serde_json::from_str(&status).expect("status json")
}

/// A TCP relay in front of a fake relay that can freeze: from then on it moves no byte in
/// either direction and closes nothing, and holds new connections unanswered.
struct Freezer {
    addr: std::net::SocketAddr,
    frozen: tokio::sync::watch::Sender<bool>,
    stalled: tokio::sync::watch::Sender<bool>,
}

impl Freezer {
    async fn start(target: std::net::SocketAddr) -> Freezer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind freezer");
        let addr = listener.local_addr().expect("freezer addr");
        let (frozen, watching) = tokio::sync::watch::channel(false);
        let (stalled, stall) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    continue;
                };
                let watching = watching.clone();
                let stall = stall.clone();
                tokio::spawn(async move {
                    let mut held = watching.clone();
                    if *held.borrow() {
                        // Accepted by the kernel, never answered: kept open until the test ends.
                        let _ = held.wait_for(|frozen| !*frozen).await;
                        std::future::pending::<()>().await;
                    }
                    let Ok(outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    let (in_read, in_write) = inbound.into_split();
                    let (out_read, out_write) = outbound.into_split();
                    tokio::join!(
                        pipe(in_read, out_write, watching.clone(), stall.clone()),
                        pipe(out_read, in_write, watching, stall)
                    );
                });
            }
        });
        Freezer {
            addr,
            frozen,
            stalled,
        }
    }

    fn freeze(&self) {
        self.frozen.send_replace(true);
    }

    /// Holds everything in both directions, losing nothing, until [`Freezer::resume`]: what
    /// a TCP retransmission or two on a lossy link look like from inside the tunnel.
    fn stall(&self) {
        self.stalled.send_replace(true);
    }

    fn resume(&self) {
        self.stalled.send_replace(false);
    }
}

/// Copies `from` to `to` until either closes; once frozen, reads what arrives and drops it,
/// as a network that lost its far end does, and never closes `to`. While stalled, holds what
/// it read until the stall ends.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: tokio::sync::watch::Receiver<bool>,
    mut stalled: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let read = match from.read(&mut buffer).await {
            Ok(0) | Err(_) if *frozen.borrow() => {
                std::future::pending::<()>().await;
                return;
            }
            Ok(0) | Err(_) => return,
            Ok(read) => read,
        };
        if *frozen.borrow() {
            continue;
        }
        let _ = stalled.wait_for(|stalled| !*stalled).await;
        if to.write_all(&buffer[..read]).await.is_err() {
            return;
        }
    }
}

/// A relay that resets every stream but its health check: the first request it resets ends
/// with a 503 and takes it out at once, without waiting for a probe to fail (its probes still
/// pass); the next request goes to relay-b.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_resets_a_request_is_taken_out_at_once() {
    let scratch = Scratch::new("balance-reset");
    let [a, b] = fake_relays().await;
    let toml = agent_toml(&scratch, &[&a, &b], &token_principal(""));
    let agent = start_healthy(&scratch, &served_at(&toml, &a, resetting_relay().await), 2).await;

    let mut caller = Caller::connect(&scratch, agent.front_addr(), false).await;
    let reset = caller.post(CONVERSE, Some(TOKEN), b"{}").await;
    assert_eq!(reset.status, 503, "{:?}", reset.body);
    assert_eq!(reset.error_type(), "ServiceUnavailableException");
    let next = caller.post(CONVERSE, Some(TOKEN), b"{}").await;
    assert_eq!(next.status, 200);
    assert_eq!(relay_of(&next), "relay-b");

    let status = status(&agent).await;
    assert_eq!(status["relays"][0]["state"], "down", "{status}");
    let metrics = admin_get(agent.admin_addr(), "/metrics").await.1;
    assert!(
        metrics.contains(
            "xpart_agent_relay_ejections_total{reason=\"stream_reset\",relay=\"relay-a\"} 1"
        ),
        "{metrics}"
    );
    agent.shutdown().await;
}

/// An HTTP/2 relay that answers its health check and resets every other stream.
async fn resetting_relay() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind resetting relay");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let Ok(mut connection) = h2::server::handshake(tcp).await else {
                    return;
                };
                while let Some(Ok((request, mut respond))) = connection.accept().await {
                    if request.uri().path() != "/_xpart/health" {
                        respond.send_reset(h2::Reason::INTERNAL_ERROR);
                        continue;
                    }
                    let head = http::Response::builder()
                        .status(200)
                        .body(())
                        .expect("static response");
                    if let Ok(mut body) = respond.send_response(head, false) {
                        let _ =
                            body.send_data(bytes::Bytes::from_static(b"{\"ready\":true}"), true);
                    }
                }
            });
        }
    });
    addr
}
