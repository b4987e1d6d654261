import torch

from via_sd_kernels import SpecMetadata, verify_binary
from via_sd_kernels.sampling import logits_to_probs, sample_from_probs, uniforms_and_noise


def test_temperature_zero_rows_are_one_hot_and_sample_their_argmax():
    logits = torch.tensor([[0.1, 2.0, -1.0], [0.1, 2.0, -1.0]])
    probs = logits_to_probs(logits, torch.tensor([0.0, 1.0]))
    assert probs[0].tolist() == [0.0, 1.0, 0.0]
    assert torch.allclose(probs[1], logits[1].softmax(-1))
    noise = torch.empty(2, 3).exponential_(generator=torch.Generator().manual_seed(0))
    assert sample_from_probs(probs, noise)[0].item() == 1


def test_a_seeded_request_verifies_the_same_whatever_shares_its_batch():
    v = 16
    g = torch.Generator().manual_seed(3)
    q_a = torch.softmax(torch.randn(3, v, generator=g), -1)  # request A: 2 drafts
    q_b = torch.softmax(torch.randn(4, v, generator=g), -1)  # request B: 3 drafts
    drafts_a, drafts_b = [1, 2], [3, 4, 5]

    def run(with_b: bool) -> list[int]:
        lists = [drafts_a] + ([drafts_b] if with_b else [])
        gens = [torch.Generator().manual_seed(42)] + ([torch.Generator().manual_seed(7)] if with_b else [])
        u, noise = uniforms_and_noise([len(x) for x in lists], v, gens)
        q = torch.cat([q_a, q_b]) if with_b else q_a
        out = verify_binary(SpecMetadata.from_lists(lists), q, None, u, noise)
        return out.output_token_ids[0, : out.num_output[0]].tolist()

    assert run(False) == run(True)
