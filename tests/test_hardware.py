"""Node config ``device`` and ``threads``: what a node computes with, set in one place (client/hardware.py)."""

from __future__ import annotations

import os

import pytest
import torch

from client import hardware
from models.errors import SiteDataError


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_auto_is_cuda_where_torch_sees_it_else_cpu():
    assert hardware.resolve({}).device == ("cuda" if torch.cuda.is_available() else "cpu")
    assert hardware.resolve({"device": "auto"}).device == hardware.resolve({}).device
    assert hardware.resolve({"device": "CPU"}).device == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this node has CUDA")
def test_cuda_on_a_node_without_it_is_refused_naming_the_site_and_key():
    with pytest.raises(SiteDataError, match=r"site Aarhus: node config device='cuda', but torch sees no CUDA"):
        hardware.resolve({"device": "cuda", "site-name": "Aarhus"})


def test_bad_values_name_the_key_and_the_node():
    with pytest.raises(SiteDataError, match=r"node partition 3: node config device='tpu'; choose one of"):
        hardware.resolve({"device": "tpu", "partition-id": 3})
    with pytest.raises(SiteDataError, match=r"site Vejle: node config threads='many' is not a whole number"):
        hardware.resolve({"threads": "many", "site-name": "Vejle"})
    with pytest.raises(SiteDataError, match="must be 0"):
        hardware.resolve({"threads": -2})


def test_threads_default_to_what_the_process_is_given_not_one(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert hardware.resolve({}).threads == len(os.sched_getaffinity(0))
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # as Ray sets it for a simulated node with num-cpus = 3
    assert hardware.resolve({}).threads == 3
    assert hardware.resolve({"threads": 1}).threads == 1


def test_configure_sets_torchs_thread_count():
    assert hardware.configure({"threads": 1, "device": "cpu"}) == hardware.Hardware("cpu", 1)
    assert torch.get_num_threads() == 1
    hardware.configure({"threads": 2})
    assert torch.get_num_threads() == 2
