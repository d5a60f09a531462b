"""Shared noise and timesteps: pair halves identical, pairs independent, generator-reproducible."""
import torch

from dpo_tutorial.noise import shared_noise, shared_timesteps


def test_shared_noise_halves_identical_and_pairs_differ():
    latents = torch.zeros(8, 4, 5, 5)
    noise = shared_noise(latents, torch.Generator().manual_seed(0))
    assert noise.shape == latents.shape and noise.dtype == latents.dtype
    first, second = noise.chunk(2)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert not torch.allclose(first[0], first[1])
    assert abs(noise.std().item() - 1) < 0.15


def test_shared_timesteps_pairs_match():
    t = shared_timesteps(64, 1000, generator=torch.Generator().manual_seed(0))
    assert t.shape == (128,) and t.dtype == torch.long
    assert torch.equal(t[:64], t[64:])
    assert 0 <= t.min() and t.max() < 1000
    assert len(set(t[:64].tolist())) > 50  # pairs draw different timesteps


def test_the_draws_come_from_the_given_generator_and_only_b_samples_are_drawn():
    """Pinned against an independent draw: B noises (not 2B) and B timesteps from the generator, in that order."""
    latents = torch.zeros(6, 4, 3, 3)
    noise = shared_noise(latents, torch.Generator().manual_seed(7))
    torch.testing.assert_close(noise[:3], torch.randn(3, 4, 3, 3, generator=torch.Generator().manual_seed(7)),
                               rtol=0, atol=0)
    t = shared_timesteps(3, 1000, generator=torch.Generator().manual_seed(7))
    assert t[:3].tolist() == torch.randint(0, 1000, (3,), generator=torch.Generator().manual_seed(7)).tolist()


def test_odd_batch_rejected():
    try:
        shared_noise(torch.zeros(3, 1))
    except ValueError as err:
        assert "2B rows" in str(err)
    else:
        raise AssertionError("odd batch accepted")
