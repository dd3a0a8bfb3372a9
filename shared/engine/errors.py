"""Engine errors that servers map to status codes (torch-free: the gateway imports it without torch)."""


class EngineDead(RuntimeError):
    """The engine thread failed (a bug, or a peer rank of its EP group gone); nothing more will run on it."""
