//! The relay in its normal local mode: WireGuard in userspace on 127.0.0.1, an agent-side
//! tunnel speaking HTTP/2 (prior knowledge) to the relay's service address on the tunnel IP,
//! answered by the echo model. No AWS credentials and no traffic outside loopback.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use xpart_relay::config::RelayConfig;
use xpart_tunnel::{Mode, PeerConfig, PrivateKey, Tunnel, TunnelConfig};

use support::{echo, http2, keep_credentials_lookups_on_loopback, relay_toml, within, SERVICE};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_reaches_the_echo_model_over_http2_through_the_tunnel() {
    keep_credentials_lookups_on_loopback();
    let dir = std::env::temp_dir().join(format!("xpart-relay-tunnel-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let relay_key = PrivateKey::generate();
    let agent_key = PrivateKey::generate();
    let text = relay_toml(
        &dir,
        &relay_key,
        &agent_key,
        "",
        "\n[admin]\nlisten = \"127.0.0.1:0\"\n",
    );
    let config = RelayConfig::from_toml_str(&text, "relay.toml").unwrap();
    let relay = xpart_relay::start(config).await.unwrap();
    let relay_udp = relay.udp_addr().expect("userspace mode has a UDP socket");
    assert_eq!(relay.service_addr(), SERVICE.parse().unwrap());

    let agent = Tunnel::start(TunnelConfig {
        private_key: agent_key,
        address: "100.64.0.1/30".parse().unwrap(),
        mode: Mode::Userspace,
        listen: Some("127.0.0.1:0".parse().unwrap()),
        mtu: 1420,
        interface_name: None,
        peers: vec![PeerConfig {
            name: "relay".into(),
            public_key: relay_key.public_key(),
            endpoint: Some(relay_udp),
            allowed_ips: vec!["100.64.0.2/32".parse().unwrap()],
            persistent_keepalive: None,
            preshared_key: None,
        }],
    })
    .await
    .unwrap();

    let conn = within(agent.network().connect(SERVICE.parse().unwrap()))
        .await
        .unwrap();
    let mut sender = http2(conn).await;

    let health = http::Request::get("http://100.64.0.2:8080/_xpart/health")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = within(sender.send_request(health)).await.unwrap();
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let health: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(health["ready"], true);
    assert_eq!(health["credentials"], false);

    let headers = echo(&mut sender, "through the tunnel").await;
    assert!(headers.contains_key("x-xpart-request-id"));

    // Without credentials a real model is refused promptly, naming the reason.
    let real = http::Request::post("http://100.64.0.2:8080/model/anthropic.claude-v2/converse")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let response = within(sender.send_request(real)).await.unwrap();
    assert_eq!(response.status(), 503);
    assert!(response.headers()["x-amzn-errortype"]
        .to_str()
        .unwrap()
        .starts_with("ServiceUnavailableException"));

    // The admin port reports the tunnel peer's traffic.
    let metrics = admin_get(relay.admin_addr().unwrap(), "/metrics").await;
    let rx_line = metrics
        .lines()
        .find(|l| l.starts_with("xpart_tunnel_peer_bytes_total{direction=\"rx\",peer=\"agent-a\"}"))
        .unwrap_or_else(|| panic!("no peer rx bytes in:\n{metrics}"));
    let rx: u64 = rx_line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(rx > 0, "{rx_line}");
    assert!(metrics.contains("xpart_relay_credentials_available 0"));

    // An idle HTTP/2 connection from the agent does not hold up the relay's shutdown.
    let stopping = std::time::Instant::now();
    within(relay.shutdown()).await;
    assert!(
        stopping.elapsed() < Duration::from_secs(5),
        "{:?}",
        stopping.elapsed()
    );
    drop(sender);
    agent.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

async fn admin_get(addr: SocketAddr, path: &str) -> String {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the admin server");
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("HTTP/1.1 handshake with the admin server");
    tokio::spawn(connection);
    let request = http::Request::get(path)
        .header("host", addr.to_string())
        .body(Full::new(Bytes::new()))
        .expect("admin request");
    let response = within(sender.send_request(request))
        .await
        .expect("admin response");
    let body = response
        .into_body()
        .collect()
        .await
        .expect("admin response body")
        .to_bytes();
    String::from_utf8(body.to_vec()).expect("admin answers in UTF-8")
}
