"""`python -m pendra_fetcher`: the fetcher service, as its container runs it."""

from pendra_shared.service import run_service

from pendra_fetcher.worker import run

if __name__ == "__main__":
    run_service("fetcher", run)
