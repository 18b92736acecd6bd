"""`dlmoe serve`: an OpenAI-compatible HTTP server for a dlmoe run or a converted checkpoint.

Outside the library core: it imports `dlmoe.generate` and the run loader, nothing in `dlmoe`
imports it (the `dlmoe serve` command loads it on use), and its dependencies are the `serve`
extra (`pip install 'dlmoe[serve]'`: FastAPI, uvicorn, sse-starlette, prometheus-client).

    engine = Engine.from_run("runs/demo")
    app = create_app(engine, BatchSettings(max_batch_rows=16, max_wait_ms=10))
    uvicorn.run(app, host="127.0.0.1", port=8000)
"""

from dlmoe.serve.app import create_app
from dlmoe.serve.batcher import BatchSettings
from dlmoe.serve.engine import Engine

__all__ = ["BatchSettings", "Engine", "create_app"]
