"""The slim verifier over vLLM's own model: a layer-skipping pass that calls the decoder layers'
sub-modules directly, in eager mode, under the caller's forward context.

Contract: `slim_forward(model, input_ids, positions, route)` runs embeddings, then for every
layer i the attention sub-layer if `route.attn[i]` and the MLP sub-layer if `route.mlp[i]`
(pre-norm residual form `x = x + f(norm(x))`), then the final norm; it returns the hidden states
`[num_tokens, hidden]`. Attention sub-layers read and write the same paged KV cache as the full
forward, through `forward_context.attn_metadata[layer_name]` and `slot_mapping[layer_name]`, so
a skipped attention sub-layer neither reads nor writes its K/V. With a route that skips nothing
the result equals vLLM's own forward up to float rounding (vLLM fuses the residual add into the
norm).

Supported: Llama-family models whose decoder layers have `input_layernorm`, `self_attn`,
`post_attention_layernorm` and `mlp` (Llama, Mistral, Qwen2, SmolLM2, ...), one pipeline stage.
"""

from __future__ import annotations

import torch

from server.vllm_plugin.route import SlimRoute


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    inner = model.model
    return list(inner.layers[inner.start_layer : inner.end_layer])


def check_supported(model: torch.nn.Module) -> str | None:
    """None when the slim pass can run over `model`, else why not."""
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "embed_input_ids"):
        return f"{type(model).__name__} has no Llama-style `model.layers` / `embed_input_ids`"
    if inner.start_layer != 0 or inner.end_layer != len(inner.layers):
        return "pipeline parallelism is not supported by the slim pass"
    for name in ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp"):
        if not hasattr(inner.layers[0], name):
            return f"decoder layers of {type(model).__name__} have no `{name}`"
    return None


@torch.inference_mode()
def slim_forward(
    model: torch.nn.Module,
    input_ids: torch.Tensor,  # [num_tokens]
    positions: torch.Tensor,  # [num_tokens]
    route: SlimRoute,
) -> torch.Tensor:  # [num_tokens, hidden]
    inner = model.model
    x = inner.embed_input_ids(input_ids)  # [num_tokens, hidden]
    for i, layer in enumerate(decoder_layers(model)):
        if route.attn[i]:
            x = x + layer.self_attn(positions=positions, hidden_states=layer.input_layernorm(x))
        if route.mlp[i]:
            x = x + layer.mlp(layer.post_attention_layernorm(x))
    return inner.norm(x)
