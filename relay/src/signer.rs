//! SigV4 for Bedrock (`aws-sigv4`): service `bedrock`, the configured region, the body hashed,
//! the path signed exactly as it is sent, and every header that is sent signed, `Host` included.

use std::time::SystemTime;

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{
    sign, PayloadChecksumKind, SignableBody, SignableRequest, SigningSettings,
};
use aws_sigv4::sign::v4;
use bytes::Bytes;

use crate::error::RequestError;

/// The SigV4 signing name of Bedrock Runtime (botocore's `signingName`).
pub const SIGNING_NAME: &str = "bedrock";

/// Sign `request` in place. Its URI must be absolute (`https://host/path?query`) and its
/// headers must already include `Host` and be exactly the headers that will be sent.
pub fn sign_request(
    request: &mut http::Request<Bytes>,
    credentials: &Credentials,
    region: &str,
    time: SystemTime,
) -> Result<(), RequestError> {
    let mut headers = Vec::with_capacity(request.headers().len());
    for (name, value) in request.headers() {
        let Ok(text) = value.to_str() else {
            return Err(RequestError::UnsignableHeader {
                name: name.as_str().to_string(),
            });
        };
        headers.push((name.as_str(), text));
    }
    let uri = request.uri().to_string();
    let signable = SignableRequest::new(
        request.method().as_str(),
        &uri,
        headers.into_iter(),
        SignableBody::Bytes(request.body()),
    )
    .map_err(|e| RequestError::Signing(e.to_string()))?;

    let mut settings = SigningSettings::default();
    // Sends the body hash as x-amz-content-sha256 too, so the upstream can check it directly.
    settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
    let identity = credentials.clone().into();
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name(SIGNING_NAME)
        .time(time)
        .settings(settings)
        .build()
        .map_err(|e| RequestError::Signing(e.to_string()))?
        .into();
    let (instructions, _signature) = sign(signable, &params)
        .map_err(|e| RequestError::Signing(e.to_string()))?
        .into_parts();
    instructions.apply_to_request_http1x(request);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    fn request(body: &'static [u8]) -> http::Request<Bytes> {
        http::Request::builder()
            .method("POST")
            .uri("https://bedrock-runtime.us-east-1.amazonaws.com/model/anthropic.claude-v2%3A1/converse")
            .header("host", "bedrock-runtime.us-east-1.amazonaws.com")
            .header("content-type", "application/json")
            .header("x-amzn-bedrock-trace", "ENABLED")
            .body(Bytes::from_static(body))
            .unwrap()
    }

    fn creds(token: Option<&str>) -> Credentials {
        Credentials::new(
            "AKIDEXAMPLE",
            "secret",
            token.map(str::to_string),
            None,
            "test",
        )
    }

    fn time() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_700_000_000)
    }

    fn header<'a>(r: &'a http::Request<Bytes>, name: &str) -> &'a str {
        r.headers().get(name).unwrap().to_str().unwrap()
    }

    #[test]
    fn signs_for_bedrock_in_the_configured_region_with_all_headers() {
        let mut r = request(b"{}");
        sign_request(&mut r, &creds(None), "us-east-1", time()).unwrap();
        let auth = header(&r, "authorization");
        assert!(auth.starts_with(
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20231114/us-east-1/bedrock/aws4_request"
        ));
        assert!(auth.contains(
            "SignedHeaders=content-type;host;x-amz-content-sha256;x-amz-date;x-amzn-bedrock-trace,"
        ));
        assert_eq!(header(&r, "x-amz-date"), "20231114T221320Z");
        // sha256("{}")
        assert_eq!(
            header(&r, "x-amz-content-sha256"),
            "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
        );
    }

    #[test]
    fn body_and_path_change_the_signature() {
        let sig = |r: &http::Request<Bytes>| {
            header(r, "authorization")
                .rsplit_once('=')
                .unwrap()
                .1
                .to_string()
        };
        let mut a = request(b"{}");
        let mut b = request(b"{ }");
        sign_request(&mut a, &creds(None), "us-east-1", time()).unwrap();
        sign_request(&mut b, &creds(None), "us-east-1", time()).unwrap();
        assert_ne!(sig(&a), sig(&b));
        let mut c = request(b"{}");
        sign_request(&mut c, &creds(None), "us-west-2", time()).unwrap();
        assert_ne!(sig(&a), sig(&c));
    }

    #[test]
    fn session_token_is_sent_and_signed() {
        let mut r = request(b"{}");
        sign_request(&mut r, &creds(Some("TOKEN")), "us-east-1", time()).unwrap();
        assert_eq!(header(&r, "x-amz-security-token"), "TOKEN");
        assert!(header(&r, "authorization").contains("x-amz-security-token"));
    }

    #[test]
    fn non_text_header_is_refused() {
        let mut r = request(b"{}");
        r.headers_mut().insert(
            "x-amzn-bedrock-trace",
            http::HeaderValue::from_bytes(&[0xff, 0xfe]).unwrap(),
        );
        let err = sign_request(&mut r, &creds(None), "us-east-1", time()).unwrap_err();
        assert!(matches!(err, RequestError::UnsignableHeader { .. }));
    }
}
