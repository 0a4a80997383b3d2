//! Relay failover: traffic moves to the next healthy relay within 3 s of one dying; requests
//! in flight on a dead relay end promptly with a 503, never hang.

mod fixture;

use std::sync::Arc;
use std::time::{Duration, Instant};

use fixture::*;
use xpart_agent::AgentHandle;

const CONVERSE: &str = "/model/anthropic.claude-3-haiku-20240307-v1%3A0/converse";

fn relay_of(answer: &Answer) -> String {
    let value: serde_json::Value = serde_json::from_slice(&answer.body).unwrap_or_default();
    value["relay"].as_str().unwrap_or("").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_primary_under_load_moves_traffic_within_three_seconds() {
    let (scratch, a, _b, agent) = agent_with_two_healthy_relays("failover-kill").await;
    let _probe = caller_served_by_primary(&scratch, &agent).await;

    let front = agent.front_addr();
    let scratch = Arc::new(scratch);
    let start = Instant::now();
    let kill_at = Duration::from_millis(800);
    let run_for = Duration::from_secs(5);
    let mut workers = Vec::new();
    for _ in 0..4 {
        let scratch = scratch.clone();
        workers.push(tokio::spawn(async move {
            let mut results = Vec::new();
            let mut caller = Caller::connect(&scratch, front, false).await;
            while start.elapsed() < run_for {
                let answer = caller.post(CONVERSE, Some(TOKEN), b"{}").await;
                results.push((
                    start.elapsed(),
                    answer.status,
                    answer.error_type().to_owned(),
                    relay_of(&answer),
                ));
                if answer.status != 200 {
                    // hyper keeps the HTTP/1.1 connection; pace failures a little.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            results
        }));
    }
    tokio::time::sleep(kill_at).await;
    a.kill();
    let killed = start.elapsed();

    let mut results = Vec::new();
    for worker in workers {
        results.extend(worker.await.expect("worker"));
    }
    let succeeded = results.iter().filter(|r| r.1 == 200).count();
    let failed: Vec<_> = results.iter().filter(|r| r.1 != 200).collect();
    for (_, status, error_type, _) in &failed {
        assert_eq!(*status, 503, "failures are 503-class: {failed:?}");
        assert_eq!(error_type, "ServiceUnavailableException");
    }
    let recovered = results
        .iter()
        .filter(|r| r.0 > killed + Duration::from_secs(3))
        .collect::<Vec<_>>();
    assert!(!recovered.is_empty(), "requests kept flowing");
    assert!(
        recovered.iter().all(|r| r.1 == 200 && r.3 == "relay-b"),
        "3 s after the kill every request succeeds through relay-b"
    );
    assert!(succeeded > 0);
    eprintln!(
        "failover: {} requests, {} succeeded, {} failed with 503",
        results.len(),
        succeeded,
        failed.len()
    );
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_in_flight_on_a_silent_relay_ends_with_503_promptly() {
    let (scratch, a, _b, agent) = agent_with_two_healthy_relays("failover-silent").await;

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
    let (scratch, a, _b, agent) = agent_with_two_healthy_relays("failover-partial").await;

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
    let (scratch, a, _b, agent) = agent_with_two_healthy_relays("failover-blackhole").await;
    let mut first = caller_served_by_primary(&scratch, &agent).await;

    a.kill();
    let _hole = blackhole(a.addr.port()).await;
    let front = agent.front_addr();
    let scratch = Arc::new(scratch);
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

/// An agent in front of two fake relays, `relay-a` first in priority order, once both are
/// healthy, so that traffic goes to `relay-a`.
/// A caller whose first request relay-a, the primary, answered.
async fn caller_served_by_primary(scratch: &Scratch, agent: &AgentHandle) -> Caller {
    let mut caller = Caller::connect(scratch, agent.front_addr(), false).await;
    let answer = caller.post(CONVERSE, Some(TOKEN), b"{}").await;
    assert_eq!(relay_of(&answer), "relay-a");
    caller
}

async fn agent_with_two_healthy_relays(test: &str) -> (Scratch, FakeRelay, FakeRelay, AgentHandle) {
    let scratch = Scratch::new(test);
    let a = FakeRelay::start("relay-a").await;
    let b = FakeRelay::start("relay-b").await;
    let agent = start_agent(
        &scratch,
        &agent_toml(&scratch, &[&a, &b], &token_principal("")),
    )
    .await;
    wait_ready(&agent).await;
    // Ready means one relay is healthy; give the other its first probe too.
    tokio::time::sleep(Duration::from_millis(300)).await;
    (scratch, a, b, agent)
}
