//! What operators and load balancers see: gRPC health and reflection, HTTP pages, probes, metrics.

mod common;

use common::*;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use tonic_reflection::pb::v1::{
    ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
    server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
};

fn with_http() -> discovery_server::server::Config {
    let mut config = test_config();
    config.landing_addr = Some("127.0.0.1:0".into());
    config.metrics_addr = Some("127.0.0.1:0".into());
    config
}

#[tokio::test]
async fn grpc_health_and_reflection_answer() {
    let server = start(test_config()).await;
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", server.grpc_addr.unwrap()))
            .unwrap()
            .connect()
            .await
            .unwrap();
    let mut health = HealthClient::new(channel.clone());
    for service in ["", "sidero.discovery.server.Cluster"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "service {service:?}");
    }

    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection answer {response:?}");
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"sidero.discovery.server.Cluster".to_string()),
        "{names:?}"
    );
    assert!(
        names.contains(&"grpc.health.v1.Health".to_string()),
        "{names:?}"
    );
    assert!(
        !names.iter().any(|n| n.starts_with("openspan.agent")),
        "the agent's API is not served here: {names:?}"
    );
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn landing_inspect_probes_and_metrics() {
    let server = start(with_http()).await;
    let landing = server.landing_addr.unwrap();
    let metrics = server.metrics_addr.unwrap();
    let mut c = client(&server).await;
    c.affiliate_update(update(
        "cluster-1",
        "node-a",
        Some(b"SECRET-CIPHERTEXT"),
        &[b"e1", b"e2"],
    ))
    .await
    .unwrap();
    let _ = c.affiliate_update(update("", "x", None, &[])).await; // one refused request
    let mut w = watch(&mut c, "cluster-1").await;
    next(&mut w).await;

    let (status, page) = http_get(landing, "/").await;
    assert_eq!(status, 200);
    assert!(page.contains("openspan discovery server"), "{page}");
    assert!(page.contains("<th>affiliates</th><td>1</td>"), "{page}");
    assert!(
        page.contains("<th>open watch streams</th><td>1</td>"),
        "{page}"
    );

    let (status, page) = http_get(landing, "/inspect?cluster=cluster-1").await;
    assert_eq!(status, 200);
    assert!(page.contains("node-a"), "{page}");
    assert!(
        page.contains("<td>2</td><td>17</td>"),
        "endpoint count and data size shown: {page}"
    );
    assert!(!page.contains("SECRET"), "never the encrypted bytes");
    let (status, json) = http_get(landing, "/inspect?cluster=cluster-1&format=json").await;
    assert_eq!(status, 200);
    let json: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(json["affiliates"][0]["id"], "node-a");
    assert_eq!(json["affiliates"][0]["data_bytes"], 17);
    let (status, _) = http_get(landing, "/inspect?cluster=%3Cscript%3E").await;
    assert_eq!(status, 200);
    let (_, page) = http_get(landing, "/inspect?cluster=%3Cscript%3E").await;
    assert!(!page.contains("<script>"), "cluster ids are escaped");
    assert_eq!(http_get(landing, "/inspect").await.0, 400);

    for addr in [landing, metrics] {
        assert_eq!(http_get(addr, "/healthz").await.0, 200);
        assert_eq!(http_get(addr, "/readyz").await.0, 200);
    }
    let (status, text) = http_get(metrics, "/metrics").await;
    assert_eq!(status, 200);
    for expected in [
        "discovery_clusters 1",
        "discovery_affiliates 1",
        "discovery_endpoints 2",
        "discovery_watchers 1",
        "discovery_rpcs_total{method=\"AffiliateUpdate\",code=\"OK\"} 1",
        "discovery_rpcs_total{method=\"AffiliateUpdate\",code=\"InvalidArgument\"} 1",
        "discovery_rpcs_total{method=\"Watch\",code=\"OK\"} 1",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in\n{text}");
    }
    server.shutdown().await.unwrap();
}
