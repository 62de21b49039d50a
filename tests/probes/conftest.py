"""A tiny torch LM whose completions can all be listed: exact H(θ), entropy rate and derivatives.

V = 6 tokens, stop id 2, at most 3 new tokens: each prompt has M = 1 + 5 + 25 stop-ended
completions plus 125 cut at the length limit (no stop, all tokens counted, DESIGN §3), 156 in
all. Exact quantities are computed in float64 on a float64 copy of the model with full logits
(a naive scorer independent of the engine); the probe under test runs the engine in float32.
"""

from __future__ import annotations

import copy
import itertools
import warnings

import numpy as np
import pytest
import torch

V, STOP, DEPTH = 6, 2, 3
PROMPTS = ((1, 3, 4), (1, 5))


class Enumerable:
    """Exact references for a tiny causal LM (float32 ``model``; float64 copy for the truth)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.model64 = copy.deepcopy(model).double()
        self.model64.set_attn_implementation("eager")  # forward-mode AD has no fused-attention rule
        words = [t for t in range(V) if t != STOP]
        self.seqs = [(*p, STOP) for k in range(DEPTH) for p in itertools.product(words, repeat=k)]
        self.seqs += list(itertools.product(words, repeat=DEPTH))
        self.length = np.array([len(s) for s in self.seqs], dtype=float)  # [M]
        self.stopped = np.array([s[-1] == STOP for s in self.seqs])  # [M]

    def direction(self, seed: int, scale: float) -> dict[str, torch.Tensor]:
        """A random d = θ1 − θ0 (float32) over every parameter."""
        gen = torch.Generator().manual_seed(seed)
        return {n: scale * torch.randn(p.shape, generator=gen) for n, p in self.model.named_parameters()}

    def scores(self, prompt, direction=None, alpha: float = 0.0) -> dict[str, np.ndarray]:
        """Under θ0 + α·d, for all M completions [M]: S = log p(x), the final stop token's
        log p (0 when not stopped) and, with a direction, their exact derivatives along d
        (``D``, ``D_stop``: forward-mode AD, no finite-difference error)."""
        ids = torch.tensor([list(prompt) + list(s) + [0] * (DEPTH - len(s)) for s in self.seqs])  # [M, T]
        mask = torch.tensor([[1] * len(s) + [0] * (DEPTH - len(s)) for s in self.seqs], dtype=torch.bool)
        last = torch.as_tensor(self.length, dtype=torch.long) - 1  # [M]

        def score(params):
            logits = torch.func.functional_call(self.model64, params, (ids,)).logits  # [M, T, V]
            logits = logits[:, len(prompt) - 1 : -1]  # [M, DEPTH, V]: column t scores completion token t
            tok = torch.log_softmax(logits, -1).gather(-1, ids[:, len(prompt) :, None])[..., 0] * mask
            stop = tok.gather(1, last[:, None])[:, 0] * torch.as_tensor(self.stopped)
            return tok.sum(-1), stop  # [M], [M]

        params = {n: p.detach() for n, p in self.model64.named_parameters()}
        with torch.no_grad():
            if direction is None:
                s, stop = score(params)
                return {"logp": s.numpy(), "stop_logp": stop.numpy()}
            tangent = {n: direction[n].double() for n in params}
            params = {n: p + alpha * tangent[n] for n, p in params.items()}
            with warnings.catch_warnings():  # torch's jvp decompositions call torch.jit.script
                warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", DeprecationWarning)
                (s, stop), (ds, dstop) = torch.func.jvp(score, (params,), (tangent,))
        return {"logp": s.numpy(), "stop_logp": stop.numpy(), "D": ds.numpy(), "D_stop": dstop.numpy()}

    def _counted(self, sc: dict, include: str) -> tuple[np.ndarray, np.ndarray]:
        if include == "no_eos":
            return sc["logp"] - sc["stop_logp"], self.length - self.stopped
        return sc["logp"], self.length

    def exact(self, prompts, direction=None, alpha: float = 0.0, include: str = "all") -> tuple[float, float]:
        """(H, H/E[L]) with equal mass per entry of ``prompts`` (repeats allowed), by enumeration."""
        hs, ls = [], []
        for pr in prompts:
            sc = self.scores(pr, direction, alpha)
            s, length = self._counted(sc, include)
            p = np.exp(sc["logp"])
            hs.append(-(p * s).sum())
            ls.append((p * length).sum())
        return float(np.mean(hs)), float(np.mean(hs) / np.mean(ls))

    def finite_difference(self, prompts, direction, include: str = "all", eps: float = 1e-3) -> tuple[float, float]:
        """Central differences of ``exact`` along d: (dH/dα, d(H/E[L])/dα) at α = 0.

        eps = 1e-3: the model's RMSNorm rounds to float32 even in a float64 copy, so a smaller
        step would be rounding noise; the O(eps²) truncation is ~1e-6 here.
        """
        hp, rp = self.exact(prompts, direction, eps, include)
        hm, rm = self.exact(prompts, direction, -eps, include)
        return (hp - hm) / (2 * eps), (rp - rm) / (2 * eps)

    def derivative(self, prompts, direction, include: str = "all") -> tuple[float, float]:
        """The same derivatives in closed form: dH = −Σ p (S'D + D') (Σ p D = 0), dΛ = Σ p L'D."""
        hs, ls, dh, dl = [], [], [], []
        for pr in prompts:
            sc = self.scores(pr, direction)
            s, length = self._counted(sc, include)
            d_counted = sc["D"] - (sc["D_stop"] if include == "no_eos" else 0.0)
            p = np.exp(sc["logp"])
            hs.append(-(p * s).sum())
            ls.append((p * length).sum())
            dh.append(-(p * (s * sc["D"] + d_counted)).sum())
            dl.append((p * length * sc["D"]).sum())
        H, lam, dH, dlam = map(np.mean, (hs, ls, dh, dl))
        return float(dH), float((dH - H / lam * dlam) / lam)

    def sample(self, rng: np.random.Generator, group_prompts, group_sizes):
        """Exact samples of p0: group g draws ``group_sizes[g]`` completions of ``group_prompts[g]``.

        Returns the Rollouts and, per row, the index of its completion in ``self.seqs``.
        """
        from isdelta.engine import Rollouts

        prompts, comps, groups, index = [], [], [], []
        probs = {}
        for g, (pr, size) in enumerate(zip(group_prompts, group_sizes)):
            if pr not in probs:
                p = np.exp(self.scores(pr)["logp"])
                probs[pr] = p / p.sum()
            for j in rng.choice(len(self.seqs), size=size, p=probs[pr]):
                prompts.append(list(pr))
                comps.append(list(self.seqs[j]))
                groups.append(g)
                index.append(j)
        ro = Rollouts.from_token_lists(prompts, comps, groups, eos_token_ids=STOP, pad_token_id=0)
        return ro, np.array(index)


@pytest.fixture(scope="session")
def enumerable() -> Enumerable:
    """The enumerable tiny Llama (1 layer, V = 6), random weights with a sharpened head."""
    from tests.conftest import one_layer_llama

    assert STOP == 2  # one_layer_llama's eos = pad
    torch.manual_seed(0)
    model = one_layer_llama(V, max_position_embeddings=32)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # far from uniform: entropies move visibly
    return Enumerable(model)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield
