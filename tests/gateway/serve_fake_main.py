"""`run_serve` with the fake engine, for the SIGTERM test: python -m tests.gateway.serve_fake_main ARGS."""

import argparse
import sys

import server.gateway.serve as serve
from tests.gateway.fake_engine import FakeEngine


def main() -> int:
    parser = argparse.ArgumentParser()
    serve.add_serve_arguments(parser)
    args = parser.parse_args(sys.argv[1:])
    serve.build_engine = lambda settings: FakeEngine(step_delay_s=0.02, ready=False)
    return serve.run_serve(args)


if __name__ == "__main__":
    sys.exit(main())
