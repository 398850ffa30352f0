"""Unit-test fixtures shared by the evaluator tests."""
import socket

import pytest


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to reach the network fails the test: every network must load from local files."""
    def refuse(*args, **kwargs):
        raise OSError("network access in a unit test")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
