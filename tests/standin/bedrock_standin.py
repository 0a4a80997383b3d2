"""A Bedrock Runtime stand-in for tests: HTTPS with a test certificate, SigV4 on EVERY request
checked independently of the code under test (botocore recomputes the signature from the
known test credentials), each request's headers recorded, realistic answers for the
operations (hand-framed event streams for the streaming ones), and faults on demand.

Model ids that steer it:
  standin.error.<kind>   answer with that Bedrock error (throttling, validation, access-denied,
                         model-timeout, model-error, internal, unavailable, not-found)
  standin.hold           stream the first event, then wait for release_hold() before the rest
  standin.slow           wait `slow_seconds` before answering
  *titan-embed*, *cohere.embed*
                         InvokeModel answers in Titan Text Embeddings / Cohere Embed shape,
                         EMBED_TOKENS input tokens per text; the request body is recorded
                         as `embed_request`
  standin.cut            stream every event but the last (the one with the usage), then close
                         the connection mid-body
  any id in on_demand_refused
                         400 ValidationException "…on-demand throughput isn’t supported…"
                         (the same id behind a `us.` prefix works)

The control plane (service `bedrock`, same SigV4 check) answers the reads
ListFoundationModels, GetFoundationModel, ListInferenceProfiles and GetInferenceProfile from a
fixed catalogue (control_plane_models / control_plane_profiles) with Bedrock's shapes, filters
and nextToken pagination; any other control-plane request is recorded and answered as Bedrock
would, so a test can tell that a write reached it. Every record carries the credential scope's
`region` and `service` and the `host` that was signed. Set `regions` to accept signatures
scoped to several regions on one port (default: only `region`).

Use in-process (`BedrockStandin(...).start()`) or as a program:
  python3 bedrock_standin.py --cert server.pem --key server.key --credentials creds.json
prints {"port": N} and serves GET /_standin/requests and POST /_standin/release as well.
"""

import argparse
import base64
import datetime
import hashlib
import hmac
import json
import re
import socket
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

try:
    from . import eventstream
except ImportError:  # run as a script
    import eventstream

ERROR_NAMESPACE = "http://internal.amazon.com/coral/com.amazon.bedrock/"
ERRORS = {
    "throttling": (429, "ThrottlingException", "Too many requests, please wait before trying again."),
    "validation": (400, "ValidationException", "Malformed input request, please reformat your input and try again."),
    "access-denied": (403, "AccessDeniedException", "You don't have access to the model with the specified model ID."),
    "model-timeout": (408, "ModelTimeoutException", "Model has timed out in processing the request."),
    "model-error": (424, "ModelErrorException", "The model returned an error."),
    "internal": (500, "InternalServerException", "An internal server error occurred."),
    "unavailable": (503, "ServiceUnavailableException", "Service is unavailable."),
    "not-found": (404, "ResourceNotFoundException", "Could not resolve the foundation model from the provided model identifier."),
}
# The usage each operation reports, (input, output, cache read, cache write): Converse in its
# `usage`, ConverseStream in its `metadata` event, InvokeModel in x-amzn-bedrock-*-token-count
# headers, InvokeModelWithResponseStream in its last chunk's amazon-bedrock-invocationMetrics.
USAGE = {
    "converse": (3, 4, 5, 6),
    "converse-stream": (13, 14, 15, 16),
    "invoke": (23, 24, 25, 26),
    "invoke-with-response-stream": (33, 34, 35, 36),
}
ON_DEMAND_MESSAGE = (
    "Invocation of model ID {model} with on-demand throughput isn\u2019t supported. Retry your "
    "request with the ID or ARN of an inference profile that contains this model."
)
ROUTE = re.compile(r"^/model/(?P<model>[^/]+)/(?P<op>invoke|invoke-with-response-stream|converse|converse-stream|count-tokens)$")
GUARDRAIL = re.compile(r"^/guardrail/(?P<id>[^/]+)/version/(?P<version>[^/]+)/apply$")
AUTH = re.compile(
    r"^AWS4-HMAC-SHA256 Credential=(?P<key>[^/]+)/(?P<date>\d{8})/(?P<region>[^/]+)/(?P<service>[^/]+)/aws4_request, "
    r"SignedHeaders=(?P<signed>[a-z0-9;-]+), Signature=(?P<signature>[0-9a-f]{64})$"
)
MAX_SKEW = datetime.timedelta(minutes=5)


class CredentialStore:
    """Access key id -> (secret, session token or None, expiry datetime or None)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._keys = {}

    def add(self, access_key, secret, token=None, expiry=None):
        with self._lock:
            self._keys[access_key] = (secret, token, expiry)

    def get(self, access_key):
        with self._lock:
            return self._keys.get(access_key)


class SignatureProblem(Exception):
    def __init__(self, code, message):
        super().__init__(message)
        self.code = code
        self.message = message


def verify_sigv4(method, path, headers, body, store, region, now=None):
    """Check a SigV4 header signature with botocore; return the access key id or raise."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    auth = headers.get("authorization")
    if not auth:
        raise SignatureProblem("MissingAuthenticationTokenException", "Missing Authentication Token")
    match = AUTH.match(auth)
    if not match:
        raise SignatureProblem("IncompleteSignatureException", f"Authorization header is not SigV4: {auth[:40]}")
    if match["service"] != "bedrock" or match["region"] != region:
        raise SignatureProblem(
            "InvalidSignatureException",
            f"Credential should be scoped to a valid region/service ({match['region']}/{match['service']})",
        )
    found = store.get(match["key"])
    if found is None:
        raise SignatureProblem("UnrecognizedClientException", "The security token included in the request is invalid.")
    secret, token, expiry = found
    if expiry is not None and now >= expiry:
        raise SignatureProblem("ExpiredTokenException", "The security token included in the request is expired")
    if token != headers.get("x-amz-security-token"):
        raise SignatureProblem("UnrecognizedClientException", "The security token included in the request is invalid.")
    amz_date = headers.get("x-amz-date", "")
    try:
        signed_at = datetime.datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=datetime.timezone.utc)
    except ValueError:
        raise SignatureProblem("IncompleteSignatureException", "X-Amz-Date is missing or malformed")
    if abs(now - signed_at) > MAX_SKEW or amz_date[:8] != match["date"]:
        raise SignatureProblem("InvalidSignatureException", "Signature expired or date does not match the scope")
    declared_hash = headers.get("x-amz-content-sha256")
    if declared_hash is not None and declared_hash != hashlib.sha256(body).hexdigest():
        raise SignatureProblem("InvalidSignatureException", "x-amz-content-sha256 does not match the body")
    signed = match["signed"].split(";")
    for required in ("host", "x-amz-date"):
        if required not in signed:
            raise SignatureProblem("InvalidSignatureException", f"{required} is not signed")
    missing = [h for h in signed if h not in headers]
    if missing:
        raise SignatureProblem("InvalidSignatureException", f"signed headers not sent: {missing}")
    request = AWSRequest(
        method=method,
        url=f"https://{headers['host']}{path}",
        data=body,
        headers={name: headers[name] for name in signed},
    )
    request.context["timestamp"] = amz_date
    signer = SigV4Auth(Credentials(match["key"], secret, token), "bedrock", region)
    canonical = signer.canonical_request(request)
    expected = signer.signature(signer.string_to_sign(request, canonical), request)
    if not hmac.compare_digest(expected, match["signature"]):
        raise SignatureProblem(
            "InvalidSignatureException",
            "The request signature we calculated does not match the signature you provided.",
        )
    return match["key"]


class BedrockStandin:
    def __init__(self, cert_file, key_file, store=None, region="us-east-1", host="127.0.0.1", port=0):
        self.store = store or CredentialStore()
        self.region = region
        # Credential-scope regions accepted besides `region` (a multi-region test on one port).
        self.regions = set()
        self.records = []
        self.on_demand_refused = set()
        self.slow_seconds = 5.0
        self.hold_release = threading.Event()
        self.hold_first_sent = threading.Event()
        self.hold_last_sent = threading.Event()
        self._lock = threading.Lock()
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert_file, key_file)
        context.set_alpn_protocols(["http/1.1"])
        self.server = _TlsServer((host, port), _Handler, context, self)
        self.port = self.server.server_address[1]
        self._thread = None

    def start(self):
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()
        return self

    def stop(self):
        """Stop serving and close the port: upstream is down."""
        self.hold_release.set()
        if self._thread is not None:
            self.server.shutdown()
            self._thread = None
        self.server.server_close()

    def release_hold(self):
        self.hold_release.set()

    def record(self, entry):
        with self._lock:
            self.records.append(entry)

    def requests(self):
        with self._lock:
            return list(self.records)

    def clear(self):
        with self._lock:
            self.records.clear()


class _TlsServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, handler, context, standin):
        self.context = context
        self.standin = standin
        super().__init__(address, handler)

    def finish_request(self, request, client_address):
        # The handshake runs in the request's own thread, so a stalled client blocks nobody.
        try:
            # Headers and body go out in separate writes; without this, Nagle and delayed ACKs
            # add ~40 ms to every answer.
            request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            request.settimeout(30)
            tls = self.context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            return
        self.RequestHandlerClass(tls, client_address, self)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "BedrockStandin"

    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path == "/_standin/requests":
            return self._json(200, self.server.standin.requests())
        self._control_plane("GET")

    def do_DELETE(self):
        self._control_plane("DELETE")

    def do_PUT(self):
        self._control_plane("PUT")

    def do_POST(self):
        standin = self.server.standin
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        if self.path == "/_standin/release":
            standin.release_hold()
            return self._json(200, {"released": True})
        headers = {k.lower(): v for k, v in self.headers.items()}
        entry = {"method": "POST", "path": self.path, "headers": headers, "body_length": len(body), "time": time.time()}
        entry.update(_scope_of(headers))
        if _is_control_plane(self.path):
            return self._control_plane("POST", body, headers)
        try:
            entry["access_key"] = verify_sigv4("POST", self.path, headers, body, standin.store, _signing_region(standin, headers))
            entry["verified"] = True
        except SignatureProblem as problem:
            entry["verified"] = False
            entry["problem"] = problem.message
            standin.record(entry)
            return self._error(403, problem.code, problem.message)
        standin.record(entry)
        guardrail = GUARDRAIL.match(self.path.split("?")[0])
        if guardrail:
            return self._json(200, {"usage": {"topicPolicyUnits": 1}, "action": "NONE", "outputs": [], "assessments": []})
        route = ROUTE.match(self.path.split("?")[0])
        if not route:
            return self._error(404, "UnknownOperationException", "no such operation")
        model = unquote(route["model"])
        entry["model"] = model
        op = route["op"]
        try:
            request = json.loads(body or b"{}")
        except ValueError:
            return self._error(400, "ValidationException", "Malformed input request")
        if model.startswith("standin.error."):
            kind = model[len("standin.error."):]
            status, code, message = ERRORS.get(kind, ERRORS["internal"])
            return self._error(status, code, message)
        if model in standin.on_demand_refused:
            return self._error(400, "ValidationException", ON_DEMAND_MESSAGE.format(model=model))
        if model == "standin.slow":
            time.sleep(standin.slow_seconds)
        text = _last_user_text(request)
        if op == "invoke" and ("titan-embed" in model or "cohere.embed" in model):
            entry["embed_request"] = request
            return self._embedding(model, request)
        if op == "converse":
            return self._json(200, {
                "output": {"message": {"role": "assistant", "content": [{"text": f"standin:{text}"}]}},
                "stopReason": "end_turn",
                "usage": _converse_usage(USAGE["converse"]),
                "metrics": {"latencyMs": 12},
            })
        if op == "count-tokens":
            return self._json(200, {"inputTokens": 11})
        if op == "invoke":
            return self._json(200, {
                "id": "msg_standin", "type": "message", "role": "assistant", "model": model,
                "content": [{"type": "text", "text": f"standin:{text}"}],
                "stop_reason": "end_turn", "usage": {"input_tokens": 3, "output_tokens": 4},
            }, headers=_invoke_usage_headers(USAGE["invoke"]))
        if op == "converse-stream":
            frames = [
                eventstream.event("messageStart", json.dumps({"role": "assistant"}).encode()),
                eventstream.event("contentBlockDelta", json.dumps({"contentBlockIndex": 0, "delta": {"text": "standin:"}}).encode()),
                eventstream.event("contentBlockDelta", json.dumps({"contentBlockIndex": 0, "delta": {"text": text}}).encode()),
                eventstream.event("contentBlockStop", json.dumps({"contentBlockIndex": 0}).encode()),
                eventstream.event("messageStop", json.dumps({"stopReason": "end_turn"}).encode()),
                eventstream.event("metadata", json.dumps({"usage": _converse_usage(USAGE["converse-stream"]), "metrics": {"latencyMs": 9}}).encode()),
            ]
            return self._stream(frames, hold=(model == "standin.hold"), cut=(model == "standin.cut"))
        if op == "invoke-with-response-stream":
            chunks = [
                {"type": "message_start", "message": {"role": "assistant", "model": model}},
                {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": f"standin:{text}"}},
                {"type": "message_stop", "amazon-bedrock-invocationMetrics": _invocation_metrics(USAGE["invoke-with-response-stream"])},
            ]
            frames = [
                eventstream.event("chunk", json.dumps({"bytes": base64.b64encode(json.dumps(c).encode()).decode()}).encode())
                for c in chunks
            ]
            return self._stream(frames, hold=(model == "standin.hold"), cut=(model == "standin.cut"))
        return self._error(404, "UnknownOperationException", "no such operation")

    def _control_plane(self, method, body=None, headers=None):
        """The `bedrock` service: signature checked as for the runtime, then the reads answered
        from the catalogue and anything else recorded and answered as Bedrock would."""
        standin = self.server.standin
        if body is None:
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length) if length else b""
        headers = headers or {k.lower(): v for k, v in self.headers.items()}
        entry = {"method": method, "path": self.path, "headers": headers, "body_length": len(body), "time": time.time()}
        entry.update(_scope_of(headers))
        entry["operation"] = control_plane_operation(method, self.path)
        try:
            entry["access_key"] = verify_sigv4(method, self.path, headers, body, standin.store, _signing_region(standin, headers))
            entry["verified"] = True
        except SignatureProblem as problem:
            entry["verified"] = False
            entry["problem"] = problem.message
            standin.record(entry)
            return self._error(403, problem.code, problem.message)
        standin.record(entry)
        status, answer = control_plane_answer(entry["operation"], self.path, entry.get("region") or standin.region)
        if status >= 400:
            return self._error(status, answer[0], answer[1])
        return self._json(status, answer)

    def _stream(self, frames, hold, cut=False):
        standin = self.server.standin
        if cut:
            frames = frames[:-1]
        self.send_response(200)
        self.send_header("Content-Type", "application/vnd.amazon.eventstream")
        self.send_header("X-Amzn-Bedrock-Content-Type", "application/json")
        self.send_header("x-amzn-RequestId", "standin-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for i, frame in enumerate(frames):
            if hold and i == 1:
                standin.hold_first_sent.set()
                standin.hold_release.wait(timeout=30)
            if hold and i == len(frames) - 1:
                standin.hold_last_sent.set()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(frame), frame))
            self.wfile.flush()
        if cut:
            # No last chunk: the connection closes mid-body, as when upstream dies.
            self.close_connection = True
            return
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _embedding(self, model, request):
        """Titan Text Embeddings (one inputText) or Cohere Embed (a batch of texts), with
        EMBED_TOKENS input tokens per text."""
        if "titan-embed" in model:
            dims = request.get("dimensions", 1024)
            if dims not in (256, 512, 1024) or not request.get("inputText"):
                return self._error(400, "ValidationException", "Malformed input request")
            vector = _embedding_vector(request["inputText"], dims)
            answer = {"embedding": vector, "inputTextTokenCount": EMBED_TOKENS}
            if request.get("embeddingTypes"):
                answer["embeddingsByType"] = {"float": vector}
            return self._json(200, answer, headers={"X-Amzn-Bedrock-Input-Token-Count": str(EMBED_TOKENS)})
        texts = request.get("texts") or []
        if not texts or len(texts) > 96 or "input_type" not in request:
            return self._error(400, "ValidationException", "Malformed input request")
        vectors = [_embedding_vector(t, 1024) for t in texts]
        if request.get("embedding_types"):
            answer = {"id": "standin-embed", "texts": texts, "embeddings": {"float": vectors},
                      "response_type": "embeddings_by_type"}
        else:
            answer = {"id": "standin-embed", "texts": texts, "embeddings": vectors,
                      "response_type": "embeddings_floats"}
        tokens = str(EMBED_TOKENS * len(texts))
        return self._json(200, answer, headers={"X-Amzn-Bedrock-Input-Token-Count": tokens})

    def _json(self, status, value, headers=None):
        body = json.dumps(value).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("x-amzn-RequestId", "standin-request")
        for name, header_value in (headers or {}).items():
            self.send_header(name, header_value)
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status, code, message):
        body = json.dumps({"message": message}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("x-amzn-ErrorType", f"{code}:{ERROR_NAMESPACE}")
        self.send_header("x-amzn-RequestId", "standin-error")
        self.end_headers()
        self.wfile.write(body)


def _converse_usage(usage):
    input_tokens, output_tokens, cache_read, cache_write = usage
    return {"inputTokens": input_tokens, "outputTokens": output_tokens,
            "totalTokens": input_tokens + output_tokens + cache_read + cache_write,
            "cacheReadInputTokens": cache_read, "cacheWriteInputTokens": cache_write}


def _invoke_usage_headers(usage):
    input_tokens, output_tokens, cache_read, cache_write = usage
    return {"X-Amzn-Bedrock-Input-Token-Count": str(input_tokens),
            "X-Amzn-Bedrock-Output-Token-Count": str(output_tokens),
            "X-Amzn-Bedrock-Cache-Read-Input-Token-Count": str(cache_read),
            "X-Amzn-Bedrock-Cache-Write-Input-Token-Count": str(cache_write),
            "X-Amzn-Bedrock-Invocation-Latency": "12"}


def _invocation_metrics(usage):
    input_tokens, output_tokens, cache_read, cache_write = usage
    return {"inputTokenCount": input_tokens, "outputTokenCount": output_tokens,
            "invocationLatency": 12, "firstByteLatency": 3,
            "cacheReadInputTokenCount": cache_read, "cacheWriteInputTokenCount": cache_write}


# Input tokens the stand-in's embedding models count for each text.
EMBED_TOKENS = 7


def _embedding_vector(text, dims):
    """A vector whose first component tells the text's length (to check order)."""
    return [len(text) / 100.0] + [((i * 37) % 101) / 101.0 - 0.5 for i in range(1, dims)]


def _last_user_text(request):
    for message in reversed(request.get("messages") or []):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            return "".join(block.get("text", "") for block in content or [] if isinstance(block, dict))
    return request.get("prompt") or request.get("inputText") or ""


def _scope_of(headers):
    """The credential scope's region and service and the signed Host, for tests that tell
    regions and services apart."""
    match = AUTH.match(headers.get("authorization", ""))
    scope = {"host": headers.get("host")}
    if match:
        scope.update(region=match["region"], service=match["service"])
    return scope


def _signing_region(standin, headers):
    """The region a signature must be scoped to: the one it names when the stand-in accepts it,
    otherwise the stand-in's own (so a wrong one fails the check)."""
    match = AUTH.match(headers.get("authorization", ""))
    if match and match["region"] in standin.regions:
        return match["region"]
    return standin.region


# --- The control plane (`bedrock.<region>.amazonaws.com`) -------------------------------------

CONTROL_PLANE_ACCOUNT = "123456789012"
CONTROL_PLANE_PREFIXES = ("/foundation-models", "/inference-profiles", "/foundation-model-availability",
                          "/guardrails", "/custom-models", "/model-customization-jobs", "/provisioned-model-throughput",
                          "/model-invocation-jobs", "/evaluation-jobs", "/logging/", "/imported-models",
                          "/model-import-jobs", "/prompt-routers", "/marketplace-model", "/tags", "/listTagsForResource",
                          "/tagResource", "/untagResource")

# (id, name, provider, input modalities, output modalities, streaming, customizations, inference types)
_MODELS = [
    ("anthropic.claude-3-5-sonnet-20240620-v1:0", "Claude 3.5 Sonnet", "Anthropic", ["TEXT", "IMAGE"], ["TEXT"], True, [], ["ON_DEMAND", "INFERENCE_PROFILE"]),
    ("anthropic.claude-3-haiku-20240307-v1:0", "Claude 3 Haiku", "Anthropic", ["TEXT", "IMAGE"], ["TEXT"], True, ["FINE_TUNING"], ["ON_DEMAND", "INFERENCE_PROFILE"]),
    ("anthropic.claude-sonnet-4-20250514-v1:0", "Claude Sonnet 4", "Anthropic", ["TEXT", "IMAGE"], ["TEXT"], True, [], ["INFERENCE_PROFILE"]),
    ("amazon.nova-lite-v1:0", "Nova Lite", "Amazon", ["TEXT", "IMAGE", "VIDEO"], ["TEXT"], True, ["FINE_TUNING", "DISTILLATION"], ["ON_DEMAND", "INFERENCE_PROFILE"]),
    ("amazon.titan-embed-text-v2:0", "Titan Text Embeddings V2", "Amazon", ["TEXT"], ["EMBEDDING"], False, [], ["ON_DEMAND"]),
    ("meta.llama3-8b-instruct-v1:0", "Llama 3 8B Instruct", "Meta", ["TEXT"], ["TEXT"], True, [], ["ON_DEMAND"]),
    ("stability.sd3-large-v1:0", "SD3 Large 1.0", "Stability AI", ["TEXT", "IMAGE"], ["IMAGE"], False, [], ["ON_DEMAND"]),
    ("cohere.command-r-v1:0", "Command R", "Cohere", ["TEXT"], ["TEXT"], True, [], ["ON_DEMAND"]),
]
# The geography prefix of a region's system-defined profiles and the regions they span.
_GEOGRAPHIES = {
    "us": ("us.", ["us-east-1", "us-east-2", "us-west-2"]),
    "eu": ("eu.", ["eu-central-1", "eu-west-1", "eu-west-3"]),
    "ap": ("apac.", ["ap-northeast-1", "ap-southeast-1", "ap-southeast-2"]),
    "ca": ("ca.", ["ca-central-1", "us-east-1"]),
    "us-gov": ("us-gov.", ["us-gov-west-1", "us-gov-east-1"]),
}
_PROFILED = ["anthropic.claude-3-5-sonnet-20240620-v1:0", "anthropic.claude-3-haiku-20240307-v1:0",
             "anthropic.claude-sonnet-4-20250514-v1:0", "amazon.nova-lite-v1:0"]
_TIMESTAMP = "2024-08-30T00:00:00Z"


def _partition(region):
    return "aws-us-gov" if region.startswith("us-gov-") else "aws"


def _geography(region):
    key = "us-gov" if region.startswith("us-gov-") else region.split("-")[0]
    return _GEOGRAPHIES.get(key, ("us.", [region]))


def control_plane_models(region):
    """The foundation models a region lists, as ListFoundationModels' modelSummaries."""
    return [
        {
            "modelArn": f"arn:{_partition(region)}:bedrock:{region}::foundation-model/{model_id}",
            "modelId": model_id,
            "modelName": name,
            "providerName": provider,
            "inputModalities": inputs,
            "outputModalities": outputs,
            "responseStreamingSupported": streaming,
            "customizationsSupported": customizations,
            "inferenceTypesSupported": inference,
            "modelLifecycle": {"status": "ACTIVE"},
        }
        for model_id, name, provider, inputs, outputs, streaming, customizations, inference in _MODELS
    ]


def control_plane_profiles(region):
    """The inference profiles a region lists: the system-defined ones of its geography and one
    application profile of the test account."""
    partition = _partition(region)
    prefix, spans = _geography(region)
    names = {m[0]: m[1] for m in _MODELS}
    profiles = []
    for model_id in _PROFILED:
        profile_id = prefix + model_id
        profiles.append({
            "inferenceProfileName": f"{prefix.rstrip('.').upper()} {names[model_id]}",
            "description": f"Routes requests to {names[model_id]} in {', '.join(spans)}.",
            "createdAt": _TIMESTAMP,
            "updatedAt": _TIMESTAMP,
            "inferenceProfileArn": f"arn:{partition}:bedrock:{region}:{CONTROL_PLANE_ACCOUNT}:inference-profile/{profile_id}",
            "models": [{"modelArn": f"arn:{partition}:bedrock:{r}::foundation-model/{model_id}"} for r in spans],
            "inferenceProfileId": profile_id,
            "status": "ACTIVE",
            "type": "SYSTEM_DEFINED",
        })
    haiku = "anthropic.claude-3-haiku-20240307-v1:0"
    profiles.append({
        "inferenceProfileName": "team-chat",
        "description": "Application profile of the test account (cost allocation).",
        "createdAt": _TIMESTAMP,
        "updatedAt": _TIMESTAMP,
        "inferenceProfileArn": f"arn:{partition}:bedrock:{region}:{CONTROL_PLANE_ACCOUNT}:application-inference-profile/standinapp01",
        "models": [{"modelArn": f"arn:{partition}:bedrock:{region}::foundation-model/{haiku}"}],
        "inferenceProfileId": "standinapp01",
        "status": "ACTIVE",
        "type": "APPLICATION",
    })
    return profiles


def _is_control_plane(path):
    return path.split("?")[0].startswith(CONTROL_PLANE_PREFIXES)


def control_plane_operation(method, path):
    """The Bedrock operation name of a control-plane request (enough of them for the tests)."""
    route = path.split("?")[0]
    parts = [unquote(p) for p in route.strip("/").split("/")]
    if method == "GET" and parts == ["foundation-models"]:
        return "ListFoundationModels"
    if method == "GET" and len(parts) == 2 and parts[0] == "foundation-models":
        return "GetFoundationModel"
    if method == "GET" and parts == ["inference-profiles"]:
        return "ListInferenceProfiles"
    if method == "GET" and len(parts) >= 2 and parts[0] == "inference-profiles":
        return "GetInferenceProfile"
    if method == "POST" and parts == ["inference-profiles"]:
        return "CreateInferenceProfile"
    if method == "DELETE" and parts[0] == "inference-profiles":
        return "DeleteInferenceProfile"
    if method == "DELETE" and parts[0] == "guardrails":
        return "DeleteGuardrail"
    if method == "GET" and parts[0] == "foundation-model-availability":
        return "GetFoundationModelAvailability"
    return f"{method} {route}"


def _query(path):
    from urllib.parse import parse_qs, urlsplit
    return {k: v[-1] for k, v in parse_qs(urlsplit(path).query, keep_blank_values=True).items()}


def _validation(message):
    return 400, ("ValidationException", message)


def control_plane_answer(operation, path, region):
    """(status, JSON body) or (status, (code, message)) for a verified control-plane request."""
    query = _query(path)
    route = path.split("?")[0]
    if operation == "ListFoundationModels":
        models = control_plane_models(region)
        if "byProvider" in query:
            models = [m for m in models if m["providerName"].lower() == query["byProvider"].lower()]
        if "byOutputModality" in query:
            models = [m for m in models if query["byOutputModality"] in m["outputModalities"]]
        if "byInferenceType" in query:
            models = [m for m in models if query["byInferenceType"] in m["inferenceTypesSupported"]]
        if "byCustomizationType" in query:
            models = [m for m in models if query["byCustomizationType"] in m["customizationsSupported"]]
        return 200, {"modelSummaries": models}
    if operation == "GetFoundationModel":
        identifier = unquote(route.split("/", 2)[2])
        identifier = identifier.split("foundation-model/", 1)[-1]
        for model in control_plane_models(region):
            if model["modelId"] == identifier:
                return 200, {"modelDetails": model}
        return 404, ("ResourceNotFoundException", "The model specified in the request is not found.")
    if operation == "ListInferenceProfiles":
        profiles = control_plane_profiles(region)
        if "type" in query:
            if query["type"] not in ("SYSTEM_DEFINED", "APPLICATION"):
                return _validation("1 validation error detected: Value at 'typeEquals' failed to satisfy constraint: "
                                   "Member must satisfy enum value set: [SYSTEM_DEFINED, APPLICATION]")
            profiles = [p for p in profiles if p["type"] == query["type"]]
        try:
            limit = int(query.get("maxResults", "1000"))
        except ValueError:
            return _validation("maxResults must be a number")
        if not 1 <= limit <= 1000:
            return _validation("1 validation error detected: Value at 'maxResults' failed to satisfy constraint: "
                               "Member must have value between 1 and 1000")
        start = 0
        if query.get("nextToken"):
            try:
                start = int(base64.b64decode(query["nextToken"]).decode().removeprefix("standin:"))
            except ValueError:
                return _validation("The nextToken is not valid.")
        page = {"inferenceProfileSummaries": profiles[start:start + limit]}
        if start + limit < len(profiles):
            page["nextToken"] = base64.b64encode(f"standin:{start + limit}".encode()).decode()
        return 200, page
    if operation == "GetInferenceProfile":
        identifier = unquote(route.split("/", 2)[2])
        for profile in control_plane_profiles(region):
            if identifier in (profile["inferenceProfileId"], profile["inferenceProfileArn"]):
                return 200, dict(profile)
        return 404, ("ResourceNotFoundException", "Inference profile not found.")
    if operation == "GetFoundationModelAvailability":
        return 200, {"modelId": unquote(route.split("/", 2)[2]), "agreementAvailability": {"status": "AVAILABLE"},
                     "authorizationStatus": "AUTHORIZED", "entitlementAvailability": "AVAILABLE",
                     "regionAvailability": "AVAILABLE"}
    if operation == "CreateInferenceProfile":
        return 201, {"inferenceProfileArn": f"arn:{_partition(region)}:bedrock:{region}:{CONTROL_PLANE_ACCOUNT}:application-inference-profile/created01", "status": "ACTIVE"}
    if operation in ("DeleteGuardrail", "DeleteInferenceProfile"):
        return 202, {}
    return 404, ("UnknownOperationException", "no such operation")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--credentials", required=True, help='JSON: {"AKID": "secret", ...}')
    parser.add_argument("--region", default="us-east-1")
    parser.add_argument("--also-region", action="append", default=[], help="accept signatures scoped to this region too")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--on-demand-refused", action="append", default=[])
    args = parser.parse_args()
    store = CredentialStore()
    with open(args.credentials) as f:
        for key, secret in json.load(f).items():
            store.add(key, secret)
    standin = BedrockStandin(args.cert, args.key, store, args.region, port=args.port)
    standin.on_demand_refused.update(args.on_demand_refused)
    standin.regions.update(args.also_region)
    standin.start()
    print(json.dumps({"port": standin.port}), flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        standin.stop()


if __name__ == "__main__":
    sys.exit(main())
