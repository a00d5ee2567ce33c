"""
Data for the trainers: JSONL files -> tokenised examples -> packs (several examples in one sequence of at most
max_seq_len tokens) -> batches, and an endless, resumable stream of packs over epochs. Also the prompt rows of RL.

Words: a *row* is one JSONL record; an *example* is one row tokenised, (ids, mask) with mask[i] = 1 where token i is
learned (from token i-1), or (chosen ids, rejected ids) for a preference pair; a *pack* is a list of examples trained
as one sequence (one example when packing is off).

    sources, stats = load_examples(["a.jsonl"], tok, mode="sft", max_seq_len=512)
    stream = PackStream(sources, None, 512, seed=1337, do_pack=True)
    batch = collate(stream.take(8), tok.pad_id)   # input_ids, targets, position_ids, doc_ids

`a.jsonl:0.7,b.jsonl:0.3` mixes files by the fraction of each epoch drawn from each (parse_data_spec, epoch_packs).
"""
import bisect

import numpy as np
import torch
import torch.distributed as dist

from data.jsonl import iter_jsonl
from reward import REQUIRED_FIELDS, rule_scored
from tasks import encode_problem, reward_model_input

# -----------------------------------------------------------------------------
# files and rows


def parse_data_spec(spec):
    """'a.jsonl:0.7,b.jsonl:0.3' -> [(path, weight)], weights normalised; no weights -> None weights."""
    items = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        path, sep, w = part.rpartition(":")
        try:
            items.append((path, float(w)) if sep else (part, None))
        except ValueError:
            items.append((part, None))
    if not items:
        raise ValueError("no data files given")
    weights = [w for _, w in items]
    if all(w is None for w in weights):
        return items
    if any(w is None or w <= 0 for w in weights):
        raise ValueError(f"--data={spec}: give a positive weight for every file, or for none")
    total = sum(weights)
    return [(p, w / total) for p, w in items]


def read_rows(path, skip_bad_rows=False):
    """[("path:line", row)]: keeping each row's line number lets later errors (no assistant turn, ...)
    point at it too. A .txt file is one document."""
    if path.endswith(".txt"):
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if not text.strip():
            raise ValueError(f"{path}: empty file")
        return [(f"{path}:1", {"text": text})]
    return [(f"{path}:{lineno}", row) for lineno, row in iter_jsonl(path, skip_bad_rows=bool(skip_bad_rows))]


# -----------------------------------------------------------------------------
# rows -> examples


def row_to_example(row, tok, mode, where):
    """One JSONL row -> (ids, mask), or (chosen ids, rejected ids) in rm mode. Raises ValueError('file:line: why')
    on anything unusable. A conversation may hold tool calls (assistant `tool_calls`, `tool` turns, the schemas in
    an optional `tools` field): the loss falls on the assistant's tokens only, never on a tool's."""
    if mode == "rm":
        return tuple(pair_ids(row, tok, where))
    if mode == "pretrain":
        text = row.get("text")
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{where}: pretrain rows need a non-empty 'text' string")
        ids = tok.encode(text) + [tok.eos_id]  # eos so the model learns where a document ends
        return ids, [1] * len(ids)
    if "messages" in row:
        messages = row["messages"]
    elif "prompt" in row and "completion" in row:
        p, c = row["prompt"], row["completion"]
        messages = ([{"role": "user", "content": p}] if isinstance(p, str) else list(p)) + \
                   ([{"role": "assistant", "content": c}] if isinstance(c, str) else list(c))
    else:
        raise ValueError(f"{where}: expected a 'messages' list or 'prompt' + 'completion' "
                         f"(got keys {sorted(row)})")
    if not isinstance(messages, list) or not any(isinstance(m, dict) and m.get("role") == "assistant"
                                                 for m in messages):
        raise ValueError(f"{where}: no assistant turn, so nothing to learn")
    if not isinstance(row.get("tools", []), list):
        raise ValueError(f"{where}: 'tools' must be a list of JSON schemas")
    try:
        ids, mask = tok.encode_chat_with_mask(messages, tools=row.get("tools"))
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    if not any(mask[1:]):
        raise ValueError(f"{where}: the assistant turns are empty")
    return ids, mask


def pair_ids(row, tok, where):
    """A preference row -> [chosen ids, rejected ids]: each side as the whole chat-templated conversation (context +
    the response as the final assistant turn, <think> kept: what the policy generates), for RewardModel to score at
    its last token. A side may be a string (the response) or a message list: the rest of the conversation after the
    context, or the whole conversation when the row has no prompt/messages."""
    missing = [k for k in ("chosen", "rejected") if k not in row]
    if missing:
        raise ValueError(f"{where}: pair row missing {' and '.join(map(repr, missing))} (rm rows need 'chosen' and "
                         f"'rejected', got keys {sorted(row)})")
    context = row.get("messages", row.get("prompt"))
    if isinstance(context, str):
        context = [{"role": "user", "content": context}]
    if context is not None and not isinstance(context, list):
        raise ValueError(f"{where}: 'prompt' must be a string or a message list, 'messages' a message list")
    out = []
    for key in ("chosen", "rejected"):
        side = row[key]
        if isinstance(side, str):
            if context is None:
                raise ValueError(f"{where}: {key!r} is a string but the row has no 'prompt' or 'messages'")
            messages = context + [{"role": "assistant", "content": side}]
        elif isinstance(side, list):
            messages = (context or []) + side
        else:
            raise ValueError(f"{where}: {key!r} must be a string or a message list, got {type(side).__name__}")
        last = messages[-1] if messages else None
        if not isinstance(last, dict) or last.get("role") != "assistant" or not str(last.get("content", "")).strip():
            raise ValueError(f"{where}: {key!r} does not end in a non-empty assistant turn")
        try:
            out.append(reward_model_input(tok, messages))
        except ValueError as e:
            raise ValueError(f"{where}: {key}: {e}") from None
    return out


def fit_length(ids, mask, max_len, mode):
    """-> list of examples that fit in max_len, and whether anything was truncated away.
    pretrain: split into windows overlapping by one token, so every token is still predicted once.
    sft: keep the first max_len tokens (the caller counts it; an example with no learned token left
    is dropped and counted separately, never trained on silently).
    rm: (ids, mask) is (chosen ids, rejected ids); a pair with a side over max_len is dropped (no pieces), since
    cutting a response would change what is scored."""
    if mode == "rm":
        too_long = max(len(ids), len(mask)) > max_len
        return ([] if too_long else [(ids, mask)]), too_long
    if len(ids) <= max_len:
        return [(ids, mask)], False
    if mode == "pretrain":
        step = max_len - 1
        return [(ids[s:s + max_len], mask[s:s + max_len]) for s in range(0, len(ids) - 1, step)], False
    return [(ids[:max_len], mask[:max_len])], True


def tokenize_rows(rows, indices, tok, mode, max_seq_len):
    """{row index: ("ok", pieces, truncated) | ("error", message)} for the given rows; pieces are
    (ids int32, mask bool) numpy arrays: 5 bytes a token instead of a Python list's ~30."""
    out = {}
    for i in indices:
        where, row = rows[i]
        try:
            ids, mask = row_to_example(row, tok, mode, where)
        except ValueError as e:
            out[i] = ("error", str(e))
            continue
        pieces, truncated = fit_length(ids, mask, max_seq_len, mode)
        second = np.int32 if mode == "rm" else bool  # rm: the rejected side's ids, not a mask
        out[i] = ("ok", [(np.asarray(a, np.int32), np.asarray(m, second)) for a, m in pieces if len(a) >= 2], truncated)
    return out


def load_examples(paths, tok, mode, max_seq_len, skip_bad_rows=False, log=print, rank=0, world=1):
    """Tokenise every file. -> list (one per file) of example lists, and a stats dict.
    Under DDP each rank tokenises only rows rank, rank+world, ... (its shard) and the ranks swap results,
    so every rank ends with the same examples in the same order (one global packing plan, which is what
    makes N ranks equal one process) for 1/world of the tokenising work."""
    out, stats = [], dict(rows=0, skipped=0, truncated=0, dropped=0)
    for path in paths:
        rows = read_rows(path, skip_bad_rows)
        done = tokenize_rows(rows, range(rank, len(rows), world), tok, mode, max_seq_len)
        if world > 1:
            parts = [None] * world
            dist.all_gather_object(parts, done)
            done = {i: r for part in parts for i, r in part.items()}
        examples, truncated_where = [], []
        for i, (where, _) in enumerate(rows):  # file order, whichever rank tokenised the row
            stats["rows"] += 1
            result = done[i]
            if result[0] == "error":  # every rank raises the same first error: none is left waiting
                if not skip_bad_rows:
                    raise ValueError(result[1])
                stats["skipped"] += 1
                continue
            _, pieces, truncated = result
            if truncated:
                stats["truncated"] += 1
                truncated_where.append(where)
                if not pieces or not pieces[0][1][1:].any():
                    stats["dropped"] += 1  # the answer was entirely past max_seq_len (rm: a side was too long)
                    continue
            examples += pieces
        if truncated_where:
            log(f"warning: {len(truncated_where)} example(s) in {path} longer than max_seq_len={max_seq_len} "
                f"were {'dropped' if mode == 'rm' else 'truncated'}, e.g. {', '.join(truncated_where[:3])}")
        if not examples:
            raise ValueError(f"{path}: no usable examples")
        out.append(examples)
    if stats["dropped"] and mode != "rm":
        log(f"warning: {stats['dropped']} truncated example(s) lost all their assistant tokens and were dropped")
    if stats["skipped"]:
        log(f"warning: skipped {stats['skipped']} bad row(s) (--skip_bad_rows=1)")
    return out, stats


def load_prompt_sources(spec, tok, template, max_prompt_len=10**9, reward_names=(), skip_bad_rows=False, log=print,
                        rm_rows=False, tools=None):
    """The prompt rows of RL: -> (one list per file of {"where", "row", "ids"}, weights or None, stats). Rows need
    `prompt` (string) or `messages` (list) and the fields their rewards use (reward.REQUIRED_FIELDS); bad rows stop
    the run with file:line (or are skipped and counted with skip_bad_rows); prompts encoded by `template` (listing
    `tools`' schemas, tasks.encode_problem) longer than max_prompt_len are skipped and counted. rm_rows
    (--reward_model): a row with no rule field is fine, the reward model scores it."""
    files = parse_data_spec(spec)
    need = sorted({f for name in reward_names for f in REQUIRED_FIELDS.get(name, ())})
    sources, stats = [], dict(rows=0, too_long=0, bad=0, rm=0)
    for path, _ in files:
        items = []
        for where, row in read_rows(path, skip_bad_rows):
            stats["rows"] += 1
            by_rm = rm_rows and not rule_scored(row)
            missing = [] if by_rm else [f for f in need if f not in row]
            error = None
            if not isinstance(row.get("prompt"), str) and not isinstance(row.get("messages"), list):
                error = f"{where}: needs 'prompt' (a string) or 'messages' (a list)"
            elif missing:
                error = (f"{where}: missing field(s) {', '.join(map(repr, missing))} (needed by the reward(s) "
                         f"{', '.join(reward_names)}"
                         f"{'' if rm_rows else '; or pass --reward_model=DIR to score rows without them'})")
            if error and not skip_bad_rows:
                raise ValueError(error)
            stats["bad"] += bool(error)
            ids = None if error else encode_problem(tok, row, template, tools)
            if ids is not None and len(ids) > max_prompt_len:
                stats["too_long"] += 1
            elif ids is not None:
                items.append({"where": where, "row": row, "ids": ids})
                stats["rm"] += by_rm
        if not items:
            raise ValueError(f"{path}: no usable prompts ({stats['too_long']} longer than "
                             f"max_prompt_len={max_prompt_len})")
        sources.append(items)
    if stats["too_long"]:
        log(f"warning: skipped {stats['too_long']} prompt(s) longer than max_prompt_len={max_prompt_len}")
    if stats["bad"]:
        log(f"warning: skipped {stats['bad']} bad row(s) (--skip_bad_rows=1)")
    return sources, (None if files[0][1] is None else [w for _, w in files]), stats


# -----------------------------------------------------------------------------
# packing and batching


def pack_best_fit(lengths, max_len):
    """Best-fit decreasing: longest first, each into the open pack with the least room that still fits.
    -> list of packs, each a list of indices into lengths. Packs hold <= max_len tokens."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    packs, free = [], []  # free: sorted (room left, pack index) of packs that still have room
    for i in order:
        n = lengths[i]
        j = bisect.bisect_left(free, (n, -1))
        if j < len(free):
            room, r = free.pop(j)
        else:
            room, r = max_len, len(packs)
            packs.append([])
        packs[r].append(i)
        if room - n > 0:
            bisect.insort(free, (room - n, r))
    return packs


def epoch_packs(sources, weights, max_len, seed, epoch, do_pack):
    """The packs of one epoch, a deterministic function of (seed, epoch). weights None -> every example once; else
    weight w_i -> round(w_i * total) draws from file i."""
    rng = np.random.default_rng([seed, epoch])
    total = sum(len(s) for s in sources)
    stream = []
    for src, w in zip(sources, weights or [None] * len(sources)):
        n = len(src) if w is None else round(w * total)
        while n > 0:  # whole shuffled passes, then part of one: repeats are spread evenly
            take = rng.permutation(len(src))[:n]
            stream += [src[i] for i in take]
            n -= len(take)
    if do_pack:
        packs = [[stream[i] for i in pack] for pack in pack_best_fit([len(ex[0]) for ex in stream], max_len)]
    else:
        packs = [[ex] for ex in stream]
    return [packs[i] for i in rng.permutation(len(packs))]


class PackStream:
    """Endless stream of packs across epochs (do_pack=False: one example each); its position is (epoch, index) --
    all a resume needs."""

    def __init__(self, sources, weights, max_len, seed, do_pack, epoch=0, pos=0):
        self.sources, self.weights, self.max_len, self.seed, self.do_pack = sources, weights, max_len, seed, do_pack
        self.epoch, self.pos, self._packs = epoch, pos, None

    def packs_in_epoch(self, epoch):
        return epoch_packs(self.sources, self.weights, self.max_len, self.seed, epoch, self.do_pack)

    def take(self, n):
        out = []
        while len(out) < n:
            if self._packs is None:
                self._packs = self.packs_in_epoch(self.epoch)
            chunk = self._packs[self.pos:self.pos + n - len(out)]
            out += chunk
            self.pos += len(chunk)
            if self.pos >= len(self._packs):  # a step may straddle two epochs
                self.epoch, self.pos, self._packs = self.epoch + 1, 0, None
        return out

    def state(self):
        return {"epoch": self.epoch, "pos": self.pos}


def collate(packs, pad_id, pad_to=0):
    """Packs -> tensors, padded to the longest pack (or to pad_to: static shapes under compile).
    targets[t] = next token when it is learned and in the same document,
    else -100; position_ids restart at 0 for each document; doc_ids (-1 = padding) build the mask."""
    T = max(pad_to, max(sum(len(ids) for ids, _ in pack) for pack in packs))
    B = len(packs)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    targets = torch.full((B, T), -100, dtype=torch.long)
    position_ids = torch.zeros((B, T), dtype=torch.long)
    doc_ids = torch.full((B, T), -1, dtype=torch.long)
    for b, pack in enumerate(packs):
        off = 0
        for d, (ids, mask) in enumerate(pack):
            n = len(ids)
            ids_t, mask_t = torch.tensor(ids), torch.tensor(mask, dtype=torch.bool)
            input_ids[b, off:off + n] = ids_t
            targets[b, off:off + n - 1] = torch.where(mask_t[1:], ids_t[1:], -100)
            position_ids[b, off:off + n] = torch.arange(n)
            doc_ids[b, off:off + n] = d
            off += n
    return {"input_ids": input_ids, "targets": targets, "position_ids": position_ids, "doc_ids": doc_ids}


def packed_attention_mask(doc_ids):
    """[B, T] doc ids -> [B, 1, T, T] bool block-diagonal causal mask; None when every sequence is one
    unpadded document (then plain causal attention, the fast kernel path, is exactly right).
    Padding (-1) forms its own block, so every query sees at least itself (no all-masked softmax)."""
    if bool((doc_ids == 0).all()):
        return None
    T = doc_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    return ((doc_ids[:, :, None] == doc_ids[:, None, :]) & causal)[:, None]


def collate_pairs(packs, pad_id, pad_to=0):
    """Packs of one (chosen ids, rejected ids) pair each -> input_ids / attention_mask [2B, T], right-padded: the B
    chosen sequences first, then the B rejected ones, so one forward scores both sides (one DDP forward/backward)."""
    seqs = [pack[0][0] for pack in packs] + [pack[0][1] for pack in packs]
    T = max(pad_to, max(len(s) for s in seqs))
    input_ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for b, ids in enumerate(seqs):
        input_ids[b, :len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        attention_mask[b, :len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}

