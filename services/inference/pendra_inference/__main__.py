"""`python -m pendra_inference`: the inference service, as its container runs it."""

from pendra_shared.service import run_service

from pendra_inference.app import run

if __name__ == "__main__":
    run_service("inference", run)
