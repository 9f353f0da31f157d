"""The uvicorn server of `xlstm7b serve`, with a shutdown that drains the engine first."""

import threading
import time

import uvicorn


class Server(uvicorn.Server):
    """uvicorn's server, shutting down as a vLLM user expects: on the first SIGTERM or Ctrl-C new
    requests get 503 at once while the server still listens; the running and waiting requests
    finish for at most `timeout` seconds, those left are cancelled (so a stream ends with finish
    reason "cancelled" and [DONE]); then uvicorn shuts down. A second signal exits at once."""

    def __init__(self, config, engine, timeout: float):
        super().__init__(config)
        self.engine, self.timeout = engine, timeout

    def handle_exit(self, sig, frame):
        state = self.config.app.state
        if state.shutting_down:  # the second signal: exit now
            return super().handle_exit(sig, frame)
        state.shutting_down = True  # from now on new requests get 503
        threading.Thread(target=self.drain, args=(sig, frame), name="xlstm7b-drain", daemon=True).start()

    def drain(self, sig, frame) -> None:
        self.engine.stop(self.timeout)  # every request has ended (finished or cancelled) when it returns
        jobs, deadline = self.config.app.state.jobs, time.monotonic() + 5
        while jobs and time.monotonic() < deadline:  # their last events reach their clients
            time.sleep(0.02)
        super().handle_exit(sig, frame)
