"""weights="auto" downloads from the hub when it answers, against a local fake hub (tests/train/fakehub.py): no
network. The real huggingface_hub / timm download code runs; only the endpoint and the cache move."""
import re
import time

import pytest
import torch
from huggingface_hub import constants
from safetensors.torch import load_file, save_file

from bakeoff.train import weights as W
from bakeoff.train.registry import get_spec
from tests.train.fakehub import FakeHub

SPEC = get_spec("cnn", "efficientnet_lite0", 32)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A real timm checkpoint of ``SPEC`` as the hub holds it (1000-class head), under the repo timm asks for."""
    import timm

    torch.manual_seed(1234)  # not create_backbone's seed: random init cannot pass for these weights
    path = tmp_path_factory.mktemp("served") / "model.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model(SPEC.arch).state_dict().items()}, str(path))
    repo = timm.models.get_pretrained_cfg(SPEC.hub_id).hf_hub_id
    assert repo == "timm/efficientnet_lite0.ra_in1k"
    return {f"{repo}/model.safetensors": path}


def point_hub_at(monkeypatch, tmp_path, endpoint: str, offline: bool = False) -> None:
    """HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE for this test: in the environment and in the constants
    huggingface_hub read from it at import."""
    monkeypatch.delenv(W.WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    W._probe.cache_clear()


def test_auto_downloads_when_the_hub_answers_then_finds_it_in_the_cache(served, tmp_path, monkeypatch, capsys):
    with FakeHub(served) as hub:
        point_hub_at(monkeypatch, tmp_path, hub.endpoint)
        plan = W.plan_weights(SPEC, "auto", tmp_path)
        assert (plan.kind, plan.source) == ("hub", SPEC.hub_id) and "downloaded from the hub" in plan.why
        for family in ("dinov2", "clip"):  # planning the other families probes no more
            W.plan_weights(get_spec(family), "auto")
        assert hub.requests == [("HEAD", "/")]

        backbone, info = W.create_backbone(SPEC, "auto", tmp_path)
        assert info.to_dict() == {"kind": "hub", "source": SPEC.hub_id, "sha256": None}
        assert ("GET", "/timm/efficientnet_lite0.ra_in1k/resolve/main/model.safetensors") in hub.requests
        ref = load_file(str(served["timm/efficientnet_lite0.ra_in1k/model.safetensors"]))
        got = backbone.model.state_dict()
        assert set(got) == set(ref) - {"classifier.weight", "classifier.bias"}
        for k, v in got.items():
            torch.testing.assert_close(v, ref[k], msg=k)
        assert "WARNING" not in capsys.readouterr().out

        n = len(hub.requests)
        again = W.plan_weights(SPEC, "auto", tmp_path)
        assert W.in_hub_cache(SPEC) and again == W.WeightsPlan("hub", SPEC.hub_id,
                                                                f"{SPEC.hub_id} from the Hugging Face cache")
        assert len(hub.requests) == n  # the cache is read without the network


def test_auto_falls_back_to_announced_random_init_quickly_when_the_hub_is_down(tmp_path, monkeypatch, capsys):
    down = FakeHub({})  # bound, then closed without serving: connection refused
    down.server.server_close()
    point_hub_at(monkeypatch, tmp_path, down.endpoint)
    t = time.perf_counter()
    plan = W.plan_weights(SPEC, "auto", tmp_path)
    _, info = W.create_backbone(SPEC, "auto", tmp_path)
    assert time.perf_counter() - t < 5
    assert plan.kind == "random" and f"{down.endpoint} did not answer" in plan.why
    assert info.is_random and f"WARNING cnn efficientnet_lite0: {W.RANDOM_FLAG}" in capsys.readouterr().out


def test_offline_mode_sends_nothing(served, tmp_path, monkeypatch, capsys):
    with FakeHub(served) as hub:
        point_hub_at(monkeypatch, tmp_path, hub.endpoint, offline=True)
        plan = W.plan_weights(SPEC, "auto", tmp_path)
        _, info = W.create_backbone(SPEC, "auto", tmp_path)
        assert hub.requests == []
    assert plan.kind == "random" and "HF_HUB_OFFLINE" in plan.why
    assert info.is_random and W.RANDOM_FLAG in capsys.readouterr().out


def test_a_failed_download_is_random_for_auto_and_an_error_for_pretrained(tmp_path, monkeypatch, capsys):
    with FakeHub({}) as hub:  # answers, but holds no such file
        point_hub_at(monkeypatch, tmp_path, hub.endpoint)
        _, info = W.create_backbone(SPEC, "auto", tmp_path)
        assert info.is_random
        out = capsys.readouterr().out
        assert f"hub download of {SPEC.hub_id} via timm failed" in out and W.RANDOM_FLAG in out
        with pytest.raises(W.WeightsNotFound, match=re.escape(SPEC.hub_id) + ".*" + re.escape(str(tmp_path))):
            W.create_backbone(SPEC, "pretrained", tmp_path)


def test_a_hub_that_accepts_but_never_answers_costs_one_probe_timeout():
    import socket

    with socket.create_server(("127.0.0.1", 0)) as silent:  # the kernel accepts; nobody ever replies
        t = time.perf_counter()
        failure = W._probe(f"http://127.0.0.1:{silent.getsockname()[1]}", 0.5)
        assert failure is not None and time.perf_counter() - t < 2
