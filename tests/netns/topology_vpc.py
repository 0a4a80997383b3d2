"""The Commercial "VPC" host of the whole-topology test, run inside its namespace:

    python3 topology_vpc.py --address A --cert C --key K --credentials creds.json --name NAME

serves the Bedrock stand-in (tests/standin, SigV4 checked with botocore) on A:443 and a DNS
server on A:<ephemeral> answering NAME with A (as the interface endpoint's private DNS would).
Prints {"dns": "A:port", "standin": "A:443"} once both listen, then answers each stdin line
`records` with one JSON line: the requests the stand-in received so far.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "standin"))

import bedrock_standin  # noqa: E402
import dns_server  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--credentials", required=True, help='JSON: {"AKID": "secret", ...}')
    parser.add_argument("--name", required=True)
    parser.add_argument("--region", default="us-east-1")
    args = parser.parse_args()

    store = bedrock_standin.CredentialStore()
    for key, secret in json.loads(Path(args.credentials).read_text()).items():
        store.add(key, secret)
    standin = bedrock_standin.BedrockStandin(args.cert, args.key, store, args.region,
                                             host=args.address, port=443).start()
    dns = dns_server.TestDnsServer({args.name: args.address}, host=args.address).start()
    print(json.dumps({"dns": f"{dns.address[0]}:{dns.address[1]}",
                      "standin": f"{args.address}:{standin.port}"}), flush=True)
    for line in sys.stdin:
        if line.strip() == "records":
            print(json.dumps({"records": standin.requests(), "dns_queries": dict(dns.queries)}), flush=True)
    standin.stop()
    dns.stop()


if __name__ == "__main__":
    sys.exit(main())
