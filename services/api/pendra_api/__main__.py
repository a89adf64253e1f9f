"""`python -m pendra_api`: the API gateway, as its container runs it."""

from pendra_shared.service import run_service

from pendra_api.app import run

if __name__ == "__main__":
    run_service("api", run)
