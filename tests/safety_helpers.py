"""Test detectors for the content-safety gate (safety.detector=tests.safety_helpers:<factory>) and a fixture
that refuses network access."""


def flag_everything():
    """A detector that reports an exposed-breast detection with score 0.93 on every frame it sees."""
    def detect(frame):
        h, w = frame.shape[:2]
        return [{"class": "FEMALE_BREAST_EXPOSED", "score": 0.93, "box": [0, 0, w, h]},
                {"class": "FACE_FEMALE", "score": 0.99, "box": [0, 0, 4, 4]}]
    detect.name = "test-flag-everything"
    return detect


def flag_weakly():
    """Reports a flagged class below the default threshold (0.5): must not hold the shot."""
    def detect(frame):
        return [{"class": "BUTTOCKS_EXPOSED", "score": 0.3, "box": [0, 0, 2, 2]}]
    return detect


import pytest  # noqa: E402


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection from this process fails the test (proves a step runs offline)."""
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:] if len(args) > 1 else args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
