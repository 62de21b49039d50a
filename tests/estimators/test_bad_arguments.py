"""Every public function of the estimator layer turns a bad argument into a TypeError (wrong
type) or ValueError (wrong value) whose message starts with the argument's name and says what
was expected and the fix (issue 30): None, swapped arguments where the swap shows (a float
array of log-probs as ``group``, lengths and prompt ids exchanged, entropies as log-probs, the
results of ``headline`` in the wrong order), a support size that is no count, options of the
wrong type. Never a bare AttributeError, IndexError or ``math domain error``."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest

from isdelta.estimators import estimate, estimate_per_prompt, estimate_tokens, headline, sampler_gap, weights

N, C, P = 16, 5, 4
GROUP = np.repeat(np.arange(P), N // P)


def _data():
    rng = np.random.default_rng(0)
    lp0 = -rng.uniform(0.1, 2.0, (N, C))
    mask = np.arange(C)[None, :] < rng.permutation(np.arange(1, N + 1) % C + 1)[:, None]  # ragged, L ≥ 1
    d = {
        "lp0": lp0,
        "lp1": lp0 - 0.01,
        "e0": rng.uniform(0.0, 2.0, (N, C)),
        "e1": rng.uniform(0.0, 2.0, (N, C)),
        "mask": mask,
    }
    d["S0"], d["S1"] = np.where(mask, d["lp0"], 0).sum(1), np.where(mask, d["lp1"], 0).sum(1)
    d["L"], d["H0"] = mask.sum(1), np.where(mask, d["e0"], 0).sum(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d["snis"] = estimate(d["S0"], d["S1"], d["L"], GROUP)
        d["tok"] = estimate_tokens(d["lp0"], d["lp1"], d["e0"], d["e1"], mask, GROUP)
    return d


D = _data()


def est(**kw):
    args = {"log_p0": D["S0"], "log_p1": D["S1"], "length": D["L"], "group": GROUP} | kw
    return lambda: estimate(**args)


def tokens(*args, **kw):
    args = args or (D["lp0"], D["lp1"], D["e0"], D["e1"], D["mask"], GROUP)
    return lambda: estimate_tokens(*args, **kw)


def per_prompt(*args, **kw):
    args = args or (D["S0"], D["S1"], D["L"], GROUP)
    return lambda: estimate_per_prompt(*args, **kw)


ORDER = r".*check the order: estimate\(log_p0, log_p1, length, group\)"
T, V = TypeError, ValueError
BAD = {
    # headline: results in the wrong place, support sizes that are no count
    "headline(None)": (lambda: headline(None), T, r"snis: expected the EntropyDelta .* got NoneType"),
    "headline(token, snis)": (lambda: headline(D["tok"], D["snis"]), T, r"snis: .*got a TokenDelta"),
    "headline(snis, snis)": (lambda: headline(D["snis"], D["snis"]), T, r"per_decision\[0\]: .*got an EntropyDelta"),
    "headline(snis, [token])": (lambda: headline(D["snis"], [D["tok"]]), T, r"per_decision\[0\]: .*got a list: unpack"),
    "headline(snis, None, 'cv')": (lambda: headline(D["snis"], None, "cv"), T, r"per_decision\[1\]: .*got str"),
    "headline unknown method": (
        lambda: headline(D["snis"], dataclasses.replace(D["tok"], method="dr")),
        V,
        r"per_decision\[0\]: expected a TokenDelta of method \['cv', 'pd', 'pd_sn'\], got method 'dr'",
    ),
    "headline support 0": (lambda: headline(D["snis"], support_size=0), V, r"support_size: .*\(≥ 1.*got 0"),
    "headline support -5": (lambda: headline(D["snis"], support_size=-5), V, r"support_size: .*got -5"),
    "headline support 2.5": (
        lambda: headline(D["snis"], support_size=2.5),
        T,
        r"support_size: .*an int.*got float 2.5",
    ),
    "headline support '50257'": (lambda: headline(D["snis"], support_size="50257"), T, r"support_size: .*got str"),
    "headline support True": (lambda: headline(D["snis"], support_size=True), T, r"support_size: .*got bool"),
    # estimate: options of the wrong type, arrays in each other's place
    "estimate weights=None": (est(weights=None), T, r"weights: expected one of .* \(a string\), got NoneType"),
    "estimate weights=array": (est(weights=np.ones(N)), T, r"weights: .*got ndarray"),
    "estimate include=1": (est(include=1), T, r"include: .*got int 1"),
    "estimate prompts=None": (est(prompts=None), T, r"prompts: .*got NoneType"),
    "estimate level='0.95'": (est(level="0.95"), T, r"level: expected a coverage probability .*got str '0.95'"),
    "estimate level=None": (est(level=None), T, r"level: .*got NoneType"),
    "estimate level=True": (est(level=True), T, r"level: .*got bool"),
    "estimate level=nan": (est(level=float("nan")), V, r"level: expected a coverage probability in \(0, 1\), got nan"),
    "estimate clip='2'": (est(weights="clip", clip="2"), T, r"clip: expected a number.*got str '2'"),
    "estimate log_p0=None": (est(log_p0=None), T, r"log_p0: expected a numeric array.*got None"),
    "estimate stopped='yes'": (est(stopped="yes"), T, r"stopped: expected an array of booleans"),
    "estimate group=log-probs": (est(group=D["S0"]), V, r"group: expected prompt ids .*fractional part" + ORDER),
    "estimate length=entropy sums": (est(length=D["H0"]), V, r"length: .*whole numbers.*entropy sums" + ORDER),
    "estimate length=log-probs": (est(length=D["S1"]), V, r"length: .*negative values.*log-probs" + ORDER),
    "estimate log_p1=entropy sums": (est(log_p1=D["H0"]), V, r"log_p1: expected log-probabilities" + ORDER),
    "estimate (length, group) swapped": (
        est(length=GROUP, group=np.full(N, 5)),  # equal lengths as ids: one prompt; ids as lengths: L = 0
        V,
        r"length: rows \[0, 1, 2, 3\] count 0 tokens, but their log-probs are not 0" + ORDER,
    ),
    "estimate (length, group) swapped, ragged": (
        est(length=GROUP, group=np.arange(N)),  # distinct lengths as ids: every prompt one row
        V,
        r"group: expected at least 2 rows per prompt.*If `group` holds something else \(lengths\?\)" + ORDER,
    ),
    # estimate_tokens
    "estimate_tokens method=None": (
        tokens(method=None),
        T,
        r"method: expected one of \['cv', 'pd', 'pd_sn'\] .*NoneType",
    ),
    "estimate_tokens method=['cv']": (tokens(method=["cv"]), T, r"method: .*got list"),
    "estimate_tokens level='x'": (tokens(level="x"), T, r"level: .*got str"),
    "estimate_tokens support 0": (tokens(support_size=0), V, r"support_size: .*got 0"),
    "estimate_tokens support 1.5": (tokens(support_size=1.5), T, r"support_size: .*got float"),
    "estimate_tokens mask=None": (
        tokens(D["lp0"], D["lp1"], D["e0"], D["e1"], None, GROUP),
        T,
        r"mask: expected booleans .*got None",
    ),
    "estimate_tokens token_logp0=None": (
        tokens(None, D["lp1"], D["e0"], D["e1"], D["mask"], GROUP),
        T,
        r"token_logp0: expected a numeric array.*got None",
    ),
    "estimate_tokens group=log-probs": (
        tokens(D["lp0"], D["lp1"], D["e0"], D["e1"], D["mask"], D["S0"]),
        V,
        r"group: .*fractional part" + ORDER,
    ),
    "estimate_tokens entropies as log-probs": (
        tokens(D["lp0"], D["e1"], D["e0"], D["lp1"], D["mask"], GROUP),
        V,
        r"token_logp1: .*Entropies in its place" + ORDER,
    ),
    "estimate_tokens log-probs as entropies": (
        tokens(D["lp0"], D["lp1"], D["lp0"], D["e1"], D["mask"], GROUP),
        V,
        r"token_entropy0: .*not log-probs" + ORDER,
    ),
    # estimate_per_prompt: checked before any slicing
    "per_prompt group=None": (per_prompt(D["S0"], D["S1"], D["L"], None), V, r"group: expected one prompt id per row"),
    "per_prompt group=log-probs": (per_prompt(D["S0"], D["S1"], D["L"], D["S0"]), V, r"group: .*fractional part"),
    "per_prompt group too short": (
        per_prompt(D["S0"], D["S1"], D["L"], GROUP[:-2]),
        V,
        r"group: expected shape \(16,\)",
    ),
    "per_prompt unknown option": (
        per_prompt(wieghts="none"),
        T,
        r"wieghts: not an option of estimate; expected one of",
    ),
    "per_prompt [P, G] arrays": (
        per_prompt(D["S0"].reshape(P, -1), D["S1"].reshape(P, -1), D["L"].reshape(P, -1), GROUP),
        V,
        r"log_p0: expected a 1-D array \[N\]",
    ),
    "per_prompt log_p1 too short": (per_prompt(D["S0"], D["S1"][:-1], D["L"], GROUP), V, r"log_p1: expected shape"),
    "per_prompt stopped too short": (per_prompt(stopped=np.ones(3, bool)), V, r"stopped: expected shape \(16,\)"),
    "per_prompt log_p0=None": (per_prompt(None, D["S1"], D["L"], GROUP), T, r"log_p0: .*got None"),
    # sampler_gap
    "sampler_gap tol=True": (lambda: sampler_gap(D["lp0"], D["lp0"], D["mask"], GROUP, tol=True), V, r"tol: expected"),
    "sampler_gap group=log-probs": (
        lambda: sampler_gap(D["lp0"], D["lp0"], D["mask"], D["S0"]),
        V,
        r"group: .*fractional part",
    ),
    "sampler_gap mask=None": (lambda: sampler_gap(D["lp0"], D["lp0"], None, GROUP), T, r"mask: .*got None"),
    "sampler_gap token_logq=None": (
        lambda: sampler_gap(None, D["lp0"], D["mask"], GROUP),
        T,
        r"token_logq: .*got None",
    ),
    # weights.importance_weights
    "importance_weights scheme=None": (
        lambda: weights.importance_weights(D["S1"] - D["S0"], GROUP, scheme=None),
        T,
        r"scheme: .*got NoneType",
    ),
    "importance_weights clip='x'": (
        lambda: weights.importance_weights(D["S1"] - D["S0"], GROUP, scheme="clip", clip="x"),
        T,
        r"clip: .*got str",
    ),
    "importance_weights group=log-probs": (
        lambda: weights.importance_weights(D["S1"] - D["S0"], D["S0"]),
        V,
        r"group: .*fractional part",
    ),
}


@pytest.mark.parametrize("case", BAD.keys())
def test_a_bad_argument_raises_naming_it(case):
    call, kind, pattern = BAD[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(kind, match="^" + pattern) as info:
            call()
    assert type(info.value) is kind  # not a subclass standing in for it


def test_integral_float_ids_and_numpy_ints_are_still_accepted():
    """What the checks must not refuse: group ids as floats without a fraction (a pandas column),
    numpy integers for support_size, lengths as floats."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = estimate(D["S0"], D["S1"], D["L"].astype(float), GROUP.astype(float))
        tok = estimate_tokens(D["lp0"], D["lp1"], D["e0"], D["e1"], D["mask"], GROUP.astype(float))
    assert headline(res, tok, support_size=np.int64(50_257)).method in ("cv", "snis", "pd", "pd_sn")
