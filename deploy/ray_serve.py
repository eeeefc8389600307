"""r1serve replicas as a Ray Serve deployment, for clusters that already run Ray (docs/deployment.md).

Each Ray Serve replica holds one r1serve engine on one GPU and serves r1serve's own FastAPI app (the
OpenAI-compatible routes, the R1 usage rules, /health and /metrics); Ray Serve spreads requests over the
replicas and adds or removes replicas on the number of ongoing requests. Run it with

    serve run deploy.ray_serve:app            # or: python deploy/ray_serve.py

with `R1SERVE_MODEL` naming the model folder (default: the hub id, which needs a machine that can download).
Ray is not a dependency of r1serve: install it where this runs (`pip install "ray[serve]"`).
"""

from __future__ import annotations

import os

from ray import serve

from r1serve.server.app import create_app, server_state
from r1serve.server.settings import ServerSettings

SETTINGS = ServerSettings(model=os.environ.get("R1SERVE_MODEL", "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"),
                          served_model_name=["DeepSeek-R1-Distill-Qwen-1.5B"])
# Built here so that Ray Serve can mount its routes; each replica gets its own copy, and its own engine below.
fastapi_app = create_app(None, SETTINGS)


@serve.deployment(
    ray_actor_options={"num_gpus": 1},
    autoscaling_config={"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 64},
    max_ongoing_requests=256,
    health_check_period_s=10,
    graceful_shutdown_timeout_s=SETTINGS.shutdown_grace_period,
)
@serve.ingress(fastapi_app)
class R1ServeReplica:
    """One r1serve engine behind r1serve's routes."""

    def __init__(self) -> None:
        from r1serve.engine.process_engine import make_engine

        self.state = server_state(fastapi_app)
        self.state.engine = make_engine(SETTINGS.engine_config(), in_process=False)

    def check_health(self) -> None:
        """Ray Serve restarts a replica whose engine has died."""
        if self.state.engine_dead is not None:
            raise RuntimeError(f"r1serve engine died: {self.state.engine_dead}")

    def __del__(self) -> None:
        if getattr(self, "state", None) is not None and self.state.engine is not None:
            self.state.engine.shutdown()


app = R1ServeReplica.bind()

if __name__ == "__main__":
    serve.run(app, route_prefix="/")
    import signal

    signal.pause()
