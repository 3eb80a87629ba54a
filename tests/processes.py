"""Real ``triows serve`` processes for end-to-end tests (see ``triows.process``)."""

from triows.process import Instance, free_port, serve_instance, stop_process, wait_for_status

__all__ = ["Instance", "free_port", "serve_instance", "stop_process", "wait_for_status"]
