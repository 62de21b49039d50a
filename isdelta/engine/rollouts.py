"""The rollout batch: left-padded prompts + right-padded completions (DESIGN.md §2).

P prompts, G samples each, N = P·G rows, prompt-major (row r = p·G + g, ``group[r] = p``);
ragged G is allowed through ``group``. ``input_ids`` [N, T] is a left-padded prompt block of
width ``prompt_len`` followed by a right-padded completion block of width C = T − prompt_len.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from isdelta.engine.masking import completion_mask as _completion_mask
from isdelta.engine.masking import first_stop_index, normalise_eos_ids, position_ids

__all__ = ["Rollouts"]


def _rows(bad: torch.Tensor, limit: int = 8) -> str:
    """Format the first few offending row indices of a bool [N] tensor."""
    idx = bad.nonzero().flatten().tolist()
    more = f" (and {len(idx) - limit} more)" if len(idx) > limit else ""
    return f"{idx[:limit]}{more}"


def _is_prefix_mask(mask: torch.Tensor) -> torch.Tensor:
    """Rows [N] whose 0/1 mask is ones then zeros (non-increasing along the last axis)."""
    if mask.shape[-1] < 2:
        return torch.ones(mask.shape[0], dtype=torch.bool, device=mask.device)
    return (mask[:, 1:] <= mask[:, :-1]).all(-1)


def _groups_from_keys(keys: Sequence[tuple]) -> torch.Tensor:
    """Group id per row, numbered by first appearance of each distinct key."""
    ids: dict[tuple, int] = {}
    return torch.tensor([ids.setdefault(k, len(ids)) for k in keys], dtype=torch.long)


@dataclass(frozen=True)
class Rollouts:
    """A scored batch in the isdelta layout.

    Attributes
    ----------
    input_ids : LongTensor [N, T]
    attention_mask : LongTensor [N, T]
        0 on left pads and right pads, 1 on real prompt and completion tokens.
    prompt_len : int
        Width of the prompt block; completions start at this column.
    completion_mask : BoolTensor [N, C]
        Counted tokens with the stop token included (DESIGN.md §3); the engine drops the stop
        token itself when asked to (``EngineConfig.include_eos=False``).
    group : LongTensor [N]
        Prompt index of each row.
    eos_token_ids : tuple of int
        Every id that stops generation.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompt_len: int
    completion_mask: torch.Tensor
    group: torch.Tensor
    eos_token_ids: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        self._validate()

    # ---------------------------------------------------------------- shapes and views
    @property
    def n_rows(self) -> int:
        return self.input_ids.shape[0]

    @property
    def n_prompts(self) -> int:
        return int(torch.unique(self.group).numel())

    @property
    def completion_ids(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_len :]  # [N, C]

    @property
    def prompt_ids(self) -> torch.Tensor:
        return self.input_ids[:, : self.prompt_len]  # [N, prompt_len]

    @property
    def completion_lengths(self) -> torch.Tensor:
        """Real (non-pad) completion tokens per row [N], counted or not."""
        return self.attention_mask[:, self.prompt_len :].sum(-1)

    @property
    def prompt_lengths(self) -> torch.Tensor:
        return self.attention_mask[:, : self.prompt_len].sum(-1)

    @property
    def lengths(self) -> torch.Tensor:
        """Counted tokens per row [N] (stop token included)."""
        return self.completion_mask.sum(-1)

    @property
    def stopped(self) -> torch.Tensor:
        """Rows [N] whose counted region ends with a stop token."""
        real = self.completion_lengths
        return first_stop_index(self.completion_ids, self.eos_token_ids, real) < real

    def position_ids(self) -> torch.Tensor:
        return position_ids(self.attention_mask)

    def mask(self, include_eos: bool = True) -> torch.Tensor:
        """Counted-token mask [N, C] under the given EOS convention."""
        if include_eos:
            return self.completion_mask
        return _completion_mask(self.completion_ids, self.eos_token_ids, self.completion_lengths, include_eos=False)

    def to(self, device: torch.device | str) -> Rollouts:
        return Rollouts(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.prompt_len,
            self.completion_mask.to(device),
            self.group.to(device),
            self.eos_token_ids,
        )

    def check_vocab(self, vocab_size: int) -> None:
        """Raise if a token id is outside [0, vocab_size)."""
        bad = ((self.input_ids >= vocab_size) & self.attention_mask.bool()).any(-1)
        if bad.any():
            raise ValueError(
                f"input_ids rows {_rows(bad)} hold token ids >= the model's vocab size "
                f"{vocab_size} (max id {int(self.input_ids.max())}). The rollouts were tokenized "
                "with a different tokenizer than this model's; re-tokenize with the model's own."
            )

    # ---------------------------------------------------------------- validation
    def _validate(self) -> None:
        ids, att = self.input_ids, self.attention_mask
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            raise ValueError(f"input_ids must be a LongTensor [N, T]; got {getattr(ids, 'shape', type(ids))}.")
        if ids.dtype not in (torch.long, torch.int, torch.int32, torch.int64):
            raise ValueError(f"input_ids must hold integer token ids; got dtype {ids.dtype}.")
        N, T = ids.shape
        if tuple(att.shape) != (N, T):
            raise ValueError(f"attention_mask must match input_ids [N, T] = [{N}, {T}]; got {tuple(att.shape)}.")
        if not 0 < self.prompt_len < T:
            raise ValueError(
                f"prompt_len must lie in [1, T-1] = [1, {T - 1}]; got {self.prompt_len}. Every row "
                "needs at least one prompt token (it scores the first completion token) and the "
                "completion block at least one column."
            )
        if ((att != 0) & (att != 1)).any():
            raise ValueError("attention_mask must hold only 0 and 1.")
        if (ids < 0).any():
            raise ValueError(f"input_ids rows {_rows((ids < 0).any(-1))} hold negative token ids.")
        self._validate_prompt_block()
        self._validate_completion_block()
        g = self.group
        if not isinstance(g, torch.Tensor) or tuple(g.shape) != (N,):
            raise ValueError(f"group must be a LongTensor [N] = [{N}]; got {getattr(g, 'shape', type(g))}.")
        if (g < 0).any():
            raise ValueError("group ids must be non-negative integers (one per prompt).")

    def _validate_prompt_block(self) -> None:
        pm = self.attention_mask[:, : self.prompt_len]  # [N, prompt_len]
        left_padded = (
            (pm[:, 1:] >= pm[:, :-1]).all(-1)
            if self.prompt_len > 1
            else torch.ones(pm.shape[0], dtype=torch.bool, device=pm.device)
        )
        bad = ~left_padded | (pm[:, -1] == 0)
        if bad.any():
            raise ValueError(
                f"rows {_rows(bad)}: the prompt block is not LEFT-padded (pads must come first and "
                f"the prompt must end at column prompt_len-1 = {self.prompt_len - 1}) or the prompt is "
                "empty. Tokenize prompts with tokenizer.padding_side='left', or build the batch "
                "with Rollouts.from_token_lists."
            )

    def _validate_completion_block(self) -> None:
        cm = self.attention_mask[:, self.prompt_len :]  # [N, C]
        bad = ~_is_prefix_mask(cm)
        if bad.any():
            raise ValueError(
                f"rows {_rows(bad)}: the completion block is not RIGHT-padded (real tokens must come "
                "first, then pads). Pad completions on the right."
            )
        mask = self.completion_mask
        if mask.dtype != torch.bool or tuple(mask.shape) != tuple(cm.shape):
            raise ValueError(
                f"completion_mask must be a BoolTensor [N, C] = {list(cm.shape)}; got "
                f"{mask.dtype} {tuple(mask.shape)}. Build it with isdelta.engine.completion_mask."
            )
        expected = _completion_mask(self.completion_ids, self.eos_token_ids, cm.sum(-1), include_eos=True)
        bad = (expected != mask).any(-1)
        if bad.any():
            raise ValueError(
                f"rows {_rows(bad)}: completion_mask disagrees with the real lengths and stop tokens "
                f"(eos_token_ids={list(self.eos_token_ids)}). The counted tokens are the real tokens "
                "up to and including the first stop token (DESIGN.md §3). Check eos_token_ids "
                "(all stop ids, e.g. both <|im_end|> and <|endoftext|>) and that the mask is not "
                "built from token == pad_id."
            )

    # ---------------------------------------------------------------- builders
    @classmethod
    def concat(cls, parts: Sequence[Rollouts], pad_token_id: int = 0) -> Rollouts:
        """Stack batches row-wise (re-padding both blocks); each part's prompts stay distinct.

        Group ids of part k are shifted past those of parts < k, so two parts never share a
        prompt (sampling the prompts of a run in chunks, then merging, keeps one group each).
        """
        if not parts:
            raise ValueError("concat needs at least one Rollouts.")
        eos = parts[0].eos_token_ids
        if any(p.eos_token_ids != eos for p in parts):
            raise ValueError("cannot concat rollouts with different eos_token_ids.")
        P = max(p.prompt_len for p in parts)
        C = max(p.input_ids.shape[1] - p.prompt_len for p in parts)
        ids, att, cmask, groups, offset = [], [], [], [], 0
        for p in parts:
            n, c = p.n_rows, p.input_ids.shape[1] - p.prompt_len
            left = p.input_ids.new_full((n, P - p.prompt_len), pad_token_id)
            right = p.input_ids.new_full((n, C - c), pad_token_id)
            ids.append(torch.cat([left, p.prompt_ids, p.completion_ids, right], 1))
            zl, zr = torch.zeros_like(left), torch.zeros_like(right)
            att.append(torch.cat([zl, p.attention_mask[:, : p.prompt_len], p.attention_mask[:, p.prompt_len :], zr], 1))
            cmask.append(torch.cat([p.completion_mask, zr.bool()], 1))
            _, codes = torch.unique(p.group, return_inverse=True)
            groups.append(codes + offset)
            offset += int(codes.max()) + 1
        return cls(torch.cat(ids), torch.cat(att), P, torch.cat(cmask), torch.cat(groups), eos)

    def select(self, rows: Sequence[int] | torch.Tensor) -> Rollouts:
        """The batch restricted to `rows` (same layout and widths)."""
        rows = torch.as_tensor(rows, dtype=torch.long).to(self.input_ids.device)
        return Rollouts(
            self.input_ids[rows],
            self.attention_mask[rows],
            self.prompt_len,
            self.completion_mask[rows],
            self.group[rows],
            self.eos_token_ids,
        )

    @classmethod
    def from_token_lists(
        cls,
        prompts: Sequence[Sequence[int]],
        completions: Sequence[Sequence[int]],
        group: Sequence[int] | torch.Tensor | None = None,
        *,
        eos_token_ids: int | Iterable[int],
        pad_token_id: int = 0,
        vocab_size: int | None = None,
    ) -> Rollouts:
        """Build a batch from token-id lists.

        Parameters
        ----------
        prompts : list of list of int
            Either one prompt per row (``len(prompts) == len(completions)``) or one per prompt
            with the N = P·G completions prompt-major (row r belongs to prompt r // G).
        completions : list of list of int
            Real completion tokens per row (the stop token included where one was sampled).
        group : list of int, optional
            Prompt index per row. Default: rows with identical prompt tokens share a group.
        eos_token_ids : int or iterable of int
            Stop-token ids.
        pad_token_id : int
            Filler id for pads (any id; masks never look at it).
        vocab_size : int, optional
            Check every id is below it.
        """
        N, P = len(completions), len(prompts)
        if N == 0:
            raise ValueError("completions is empty: pass at least one completion.")
        if P != N:
            if P == 0 or N % P:
                raise ValueError(
                    f"prompts has {P} entries and completions {N}: pass one prompt per row, or one "
                    "per prompt with len(completions) a multiple of it (prompt-major rows)."
                )
            G = N // P
            prompts = [prompts[r // G] for r in range(N)]
            if group is None:
                group = [r // G for r in range(N)]
        if group is None:
            group = _groups_from_keys([tuple(int(t) for t in p) for p in prompts])
        empty = [r for r, p in enumerate(prompts) if len(p) == 0]
        if empty:
            raise ValueError(f"prompts of rows {empty[:8]} are empty: every row needs >= 1 prompt token.")
        prompt_len = max(len(p) for p in prompts)
        C = max(1, max(len(c) for c in completions))
        ids = torch.full((N, prompt_len + C), int(pad_token_id), dtype=torch.long)
        att = torch.zeros((N, prompt_len + C), dtype=torch.long)
        for r, (p, c) in enumerate(zip(prompts, completions)):
            ids[r, prompt_len - len(p) : prompt_len] = torch.as_tensor(list(p), dtype=torch.long)
            att[r, prompt_len - len(p) : prompt_len] = 1
            if len(c):
                ids[r, prompt_len : prompt_len + len(c)] = torch.as_tensor(list(c), dtype=torch.long)
                att[r, prompt_len : prompt_len + len(c)] = 1
        return cls._assemble(ids, att, prompt_len, group, eos_token_ids, vocab_size)

    @classmethod
    def from_tensors(
        cls,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        completion_ids: torch.Tensor,
        completion_mask: torch.Tensor,
        *,
        eos_token_ids: int | Iterable[int],
        group: Sequence[int] | torch.Tensor | None = None,
        num_generations: int | None = None,
        vocab_size: int | None = None,
    ) -> Rollouts:
        """Build a batch from the tensors a trainer holds (TRL GRPO, verl, OpenRLHF).

        Parameters
        ----------
        prompt_ids, prompt_mask : Tensor [N, P_len]
            Left-padded prompts and their attention mask.
        completion_ids : LongTensor [N, C]
            Right-padded completions.
        completion_mask : Tensor [N, C]
            The trainer's mask: ones on real tokens up to and including the first stop token.
            It must agree with ``eos_token_ids`` (checked; a disagreement names the rows).
        eos_token_ids : int or iterable of int
        group : [N], optional
            Prompt index per row; else ``arange(N) // num_generations``; else rows with identical
            prompts share a group.
        """
        prompt_ids, completion_ids = torch.as_tensor(prompt_ids), torch.as_tensor(completion_ids)
        prompt_mask = torch.as_tensor(prompt_mask).long().to(prompt_ids.device)
        cmask = torch.as_tensor(completion_mask).long().to(completion_ids.device)
        if prompt_ids.shape != prompt_mask.shape or completion_ids.shape != cmask.shape:
            raise ValueError(
                f"prompt_ids {tuple(prompt_ids.shape)} / prompt_mask {tuple(prompt_mask.shape)} and "
                f"completion_ids {tuple(completion_ids.shape)} / completion_mask "
                f"{tuple(cmask.shape)} must match pairwise."
            )
        if prompt_ids.shape[0] != completion_ids.shape[0]:
            raise ValueError(f"prompt_ids has {prompt_ids.shape[0]} rows, completion_ids {completion_ids.shape[0]}.")
        N = prompt_ids.shape[0]
        bad = ~_is_prefix_mask(cmask)
        if bad.any():
            raise ValueError(
                f"rows {_rows(bad)}: completion_mask is not ones-then-zeros; isdelta counts the "
                "real tokens up to the first stop token, which is a prefix of each row."
            )
        if group is None and num_generations is not None:
            if N % num_generations:
                raise ValueError(f"num_generations={num_generations} does not divide N={N} rows.")
            group = torch.arange(N) // num_generations
        if group is None:
            keys = (prompt_ids * prompt_mask).cpu().tolist()
            group = _groups_from_keys([tuple(k) for k in keys])
        ids = torch.cat([prompt_ids.long(), completion_ids.long().to(prompt_ids.device)], dim=1)
        att = torch.cat([prompt_mask, cmask.to(prompt_ids.device)], dim=1)
        return cls._assemble(ids, att, prompt_ids.shape[1], group, eos_token_ids, vocab_size, cmask=cmask.bool())

    @classmethod
    def _assemble(cls, ids, att, prompt_len, group, eos_token_ids, vocab_size, cmask=None) -> Rollouts:
        """Common tail of the builders; `cmask` (a caller's own mask) is checked, not trusted."""
        eos = normalise_eos_ids(eos_token_ids)
        if not eos:
            raise ValueError("eos_token_ids is empty: pass the tokenizer's stop ids (eos_token_id).")
        group = torch.as_tensor(group, dtype=torch.long).to(ids.device)
        if cmask is None:
            cmask = _completion_mask(ids[:, prompt_len:], eos, att[:, prompt_len:].sum(-1))
        ro = cls(ids, att, prompt_len, cmask, group, eos)
        if vocab_size is not None:
            ro.check_vocab(vocab_size)
        return ro
