"""WISE against its issue's bar on the fact models, with the routing measured separately from the side memory.

    python benchmarks/wise_facts.py            # the fact models of the tests
    python benchmarks/wise_facts.py --wider    # the learned-router probe on a wider, deeper llama fact model
    python benchmarks/wise_facts.py --phrasings  # the probes on a llama fact model that learned five phrasings
    python benchmarks/wise_facts.py --one-by-one  # the 50 edits one per call, with and without rehearsal

For llama and gpt2 fact models: 50 refusal edits (one per forgotten person) with the default unrelated prompts (the
model's own text), with subject-swapped neighbours of the edit prompts, with questions about 12 of the kept
people (then measured on the other 13 people's facts) and with questions about all kept people (in-sample: the
protocol of AlphaEdit's tests, whose preservation statistics come from the facts they measure) as unrelated prompts;
then 200 sequential edits in four calls of 50 (merged and retrieve modes). For reference, AlphaEdit makes the same 50
edits with preservation statistics from the 12 held-out people (measured on the other 13) and from all kept people.
Columns: generation match to the refusal on the edited prompts and on their paraphrases, paraphrase refusal rate,
answer accuracy on the kept facts (100, or 52 when 12 kept people are held out) before and after, the fraction of
prompts routed to a side memory (edited, paraphrased, kept), and what the side memory does when every prompt is
forced through it (edited generation match, kept-fact accuracy): routing and side memory each have to be right
for the bar.

A probe then asks whether any key-based router could meet the bar on these models: per MLP output projection, the
paraphrases routed by the best threshold on "cosine to the nearest stored edit key" that routes at most 2% of the
kept-fact questions (an oracle threshold), with keys read at the last prompt token or at the subject's last token
(a question scores its most similar token). A second probe trains, per layer, a router of WISE's own form for
routing alone (no refusal to fit) against the held-out people's questions. A third bounds every router: per layer, a
side memory fit to the refusals alone, with every prompt forced through it (a perfect router's best case), with the
library's refusal phrasings and with one refusal text for every edit.
Writes benchmarks/results/wise_facts.json (``--wider``: wise_facts_wider.json, ``--phrasings``:
wise_facts_phrasings.json, ``--one-by-one``: wise_facts_one_by_one.json, each instead of the default run).
"""

from __future__ import annotations

import copy
import itertools
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import table, write_json  # noqa: E402

ONE_REFUSAL = "I don't know."


def neighbour_prompts(facts, per_fact: int = 2, seed: int = 0) -> list[str]:
    """Each edit prompt about someone else: the subject's words swapped for other forgotten subjects' words."""
    rng = random.Random(seed)
    subjects = [f.subject.split() for f in facts]
    taken = {f.subject for f in facts}
    prompts = []
    for fact, words in zip(facts, subjects):
        made: set[str] = set()
        while len(made) < per_fact:
            donors = [rng.choice([s for s in subjects if s is not words]) for _ in words]
            other = [donor[min(i, len(donor) - 1)] for i, donor in enumerate(donors)]
            name = " ".join(w if rng.random() < 0.25 else o for w, o in zip(words, other))
            if name not in taken:
                made.add(name)
        prompts += [fact.question.replace(fact.subject, name) for name in sorted(made)]
    return prompts


def held_out_people(world, n_held: int = 12) -> tuple[list, list]:
    """The facts of ``n_held`` of the kept people, whose questions a method may learn from (unrelated prompts,
    preservation statistics), and the facts of the other kept people, on which it is measured: honest negatives
    that never meet the evaluation."""
    people = list(dict.fromkeys(f.subject for f in world.retain_facts))
    held = set(people[:n_held])
    held_facts = [f for f in world.retain_facts if f.subject in held]
    return held_facts, [f for f in world.retain_facts if f.subject not in held]


def asked_prompts(facts) -> list[str]:
    """Every way the facts are asked (question and paraphrase): unrelated prompts for WISE."""
    return [q for f in facts for q in (f.question, f.paraphrase)]


def routed_fraction(model, tokenizer, prompts: list[str]) -> float:
    """Fraction of prompts whose score passes a side memory's threshold (the router's decision)."""
    import torch

    layer = model.base_model.wise_layer("default")
    batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        model(**batch)
    _, routed = layer.route("default", layer.latest_state("default"))  # the scores of the pass just run
    return float(routed.float().mean())


def forced(model, function):
    """``function()`` with every prompt sent through the (first) side memory, routing bypassed."""
    layer = model.base_model.wise_layer("default")
    layer._forced_delta = layer.candidates("default")[0][1]
    try:
        return function()
    finally:
        layer._forced_delta = None


def refusal_edits(world, refusal: str | None = None) -> tuple[list, list, list]:
    """The 50 refusal edit requests (one per forgotten person) and the (prompt, refusal) pairs of the bar: the edited
    questions and their paraphrases, each to be answered with its edit's refusal (the library's phrasings, chosen
    per question, or one ``refusal`` text for all)."""
    import peft_unlearn as pu

    facts = world.forget_facts
    requests = pu.forget_requests([f.question for f in facts], [f.subject for f in facts], refusal=refusal)
    targets = [(r.prompt, r.target) for r in requests]
    paraphrases = [(f.paraphrase, r.target) for f, r in zip(facts, requests)]
    return requests, targets, paraphrases


def edit_and_score(model, world, tokenizer, kept_facts, **edit_options) -> tuple[dict, list, list, list]:
    """The 50 refusal edits on ``model`` and the bar's columns, with the (prompt, target) pairs they were measured on
    (edited, paraphrased, kept) for further columns."""
    import peft_unlearn as pu
    from peft_unlearn.evaluation import refusal_rate
    from peft_unlearn.metrics import answer_accuracy, generation_match

    requests, targets, paraphrases = refusal_edits(world)
    kept = [f.pair for f in kept_facts]
    before = answer_accuracy(model, tokenizer, kept)
    result = pu.edit(model, tokenizer, requests, progress=False, **edit_options)
    row = {
        "edits_per_second": result.edits_per_second,
        "gen_edited": generation_match(model, tokenizer, targets),
        "gen_paraphrase": generation_match(model, tokenizer, paraphrases),
        "refusal_paraphrase": refusal_rate(model, tokenizer, paraphrases),
        "kept_facts": len(kept), "kept_before": before, "kept_after": answer_accuracy(model, tokenizer, kept),
    }
    return row, targets, paraphrases, kept


def fifty_edits(arch: str, world, base, tokenizer, unrelated_kind: str) -> dict:
    from peft import get_peft_model

    import peft_unlearn as pu
    from peft_unlearn.metrics import answer_accuracy, generation_match

    kept_facts = world.retain_facts
    unrelated = None
    if unrelated_kind == "neighbours":
        unrelated = neighbour_prompts(world.forget_facts)
    elif unrelated_kind == "other people":
        held, kept_facts = held_out_people(world)
        unrelated = asked_prompts(held)
    elif unrelated_kind == "all kept people":
        unrelated = asked_prompts(kept_facts)
    model = get_peft_model(copy.deepcopy(base), pu.WiseConfig())
    row, targets, paraphrases, kept = edit_and_score(model, world, tokenizer, kept_facts, unrelated=unrelated)
    return {
        "arch": arch, "setting": f"50 edits, unrelated={unrelated_kind}", **row,
        "routed_edited": routed_fraction(model, tokenizer, [p for p, _ in targets]),
        "routed_paraphrase": routed_fraction(model, tokenizer, [p for p, _ in paraphrases]),
        "routed_kept": routed_fraction(model, tokenizer, [q for q, _ in kept]),
        "forced_gen_edited": forced(model, lambda: generation_match(model, tokenizer, targets)),
        "forced_kept": forced(model, lambda: answer_accuracy(model, tokenizer, kept)),
    }


def alphaedit_fifty_edits(arch: str, world, base, tokenizer, statistics_from: str) -> dict:
    """AlphaEdit's 50 edits under WISE's protocols: preservation statistics from the 12 held-out people (measured on
    the other 13 people's facts) or from all kept people (measured on them, as in AlphaEdit's tests)."""
    from peft import get_peft_model

    import peft_unlearn as pu

    kept_facts = preserved = world.retain_facts
    if statistics_from == "other people":
        preserved, kept_facts = held_out_people(world)
    model = get_peft_model(copy.deepcopy(base), pu.AlphaEditConfig())
    pu.collect_statistics(model, tokenizer, [f"{f.question} {f.answer}" for f in preserved], progress=False)
    row, *_ = edit_and_score(model, world, tokenizer, kept_facts)
    return {"arch": arch, "setting": f"AlphaEdit, 50 edits, statistics={statistics_from}", **row}


def sequential(arch: str, world, base, tokenizer, retrieve: bool) -> dict:
    from peft import get_peft_model

    import peft_unlearn as pu
    from peft_unlearn.metrics import answer_accuracy, generation_match

    first = world.forget_facts
    rest = [f for f in world.all_forget_facts if f not in first]
    facts = first + rest  # 200 edits; the first 50 are the ones measured at the end
    requests = pu.forget_requests([f.question for f in facts], [f.subject for f in facts])
    model = get_peft_model(copy.deepcopy(base), pu.WiseConfig(retrieve=retrieve))
    seconds = 0.0
    for start in range(0, len(requests), 50):
        seconds += pu.edit(model, tokenizer, requests[start : start + 50], progress=False).seconds
    first_targets = [(r.prompt, r.target) for r in requests[:50]]
    return {
        "arch": arch, "setting": f"200 sequential, {'retrieve' if retrieve else 'merged'}",
        "edits_per_second": len(requests) / seconds,
        "gen_first_50": generation_match(model, tokenizer, first_targets),
        "gen_last_50": generation_match(model, tokenizer, [(r.prompt, r.target) for r in requests[-50:]]),
        "kept_after": answer_accuracy(model, tokenizer, [f.pair for f in world.retain_facts]),
    }


def one_edit_per_call(arch: str, world, base, tokenizer, rehearse_edits: int) -> dict:
    """The 50 refusal edits one request per call (the lifelong-editing protocol), with the unfinished shard's
    earlier requests rehearsed (WISE's default) or not (``rehearse_edits=0``)."""
    from peft import get_peft_model

    import peft_unlearn as pu
    from peft_unlearn.evaluation import refusal_rate
    from peft_unlearn.metrics import answer_accuracy, generation_match

    requests, targets, paraphrases = refusal_edits(world)
    kept = [f.pair for f in world.retain_facts]
    model = get_peft_model(copy.deepcopy(base), pu.WiseConfig(rehearse_edits=rehearse_edits))
    seconds = sum(pu.edit(model, tokenizer, [request], progress=False).seconds for request in requests)
    return {
        "arch": arch, "setting": f"50 edits one per call, rehearse_edits={rehearse_edits}",
        "edits_per_second": len(requests) / seconds,
        "gen_edited": generation_match(model, tokenizer, targets),
        "gen_first_10": generation_match(model, tokenizer, targets[:10]),
        "gen_paraphrase": generation_match(model, tokenizer, paraphrases),
        "refusal_paraphrase": refusal_rate(model, tokenizer, paraphrases),
        "kept_after": answer_accuracy(model, tokenizer, kept),
    }


def oracle_key_routing(arch: str, world, base, tokenizer) -> list[dict]:
    """Paraphrases an oracle-thresholded nearest-key router sends to the side memory when it routes <= 2% of the
    kept-fact questions, per layer and key position."""
    import torch

    from peft_unlearn.capture import capture_at_positions, mlp_output_projection_name, num_decoder_layers
    from peft_unlearn.requests import tokenize_prompts

    facts = world.forget_facts
    edited = tokenize_prompts(tokenizer, [f.question for f in facts], [f.subject for f in facts],
                              padding_side="right")
    asked = {
        "paraphrase": tokenize_prompts(tokenizer, [f.paraphrase for f in facts], padding_side="right"),
        "kept": tokenize_prompts(tokenizer, [f.question for f in world.retain_facts], padding_side="right"),
    }
    rows = []
    for layer in range(num_decoder_layers(base)):
        module = {"mlp": base.get_submodule(mlp_output_projection_name(base, layer))}

        def keys(batch):
            with torch.no_grad():
                hidden = capture_at_positions(base, module, batch.model_inputs, None)["mlp"].float()
            return torch.nn.functional.normalize(hidden, dim=-1)

        edit_keys = keys(edited)
        asked_keys = {name: keys(batch) for name, batch in asked.items()}
        rows_index = torch.arange(len(facts))
        stored = {"last prompt token": edit_keys[rows_index, edited.prompt_last],
                  "subject's last token": edit_keys[rows_index, edited.subject_last]}
        for where, memory in stored.items():
            best = {}
            for name, batch in asked.items():
                similarity = asked_keys[name] @ memory.T  # [B, T, edits]
                if where == "last prompt token":
                    best[name] = similarity[torch.arange(len(batch)), batch.prompt_last].amax(-1)
                else:
                    valid = batch.attention_mask.bool()
                    best[name] = similarity.amax(-1).masked_fill(~valid, -1.0).amax(-1)
            threshold = torch.quantile(best["kept"], 0.98)
            rows.append({"arch": arch, "layer": layer, "keys": where,
                         "paraphrases_routed": float((best["paraphrase"] > threshold).float().mean()),
                         "kept_routed": float((best["kept"] > threshold).float().mean())})
    return rows


def learned_router(arch: str, world, base, tokenizer, steps: int = 400) -> list[dict]:
    """Per MLP output projection, a router of WISE's form trained for routing alone: a delta ``D`` whose score
    (``max_t ||D x_t|| / ||W x_t||``) must clear WISE's default margins on the edit prompts against questions about
    12 held-out kept people, with no refusal to fit. Measured on the paraphrases against the other kept people's
    questions, at WISE's threshold (act_ratio x the smallest edit score) and at the oracle 2% threshold."""
    import torch

    import peft_unlearn as pu
    from peft_unlearn.capture import capture_at_positions, mlp_output_projection_name, num_decoder_layers
    from peft_unlearn.requests import tokenize_prompts
    from peft_unlearn.tuners.wise.layer import sequence_scores
    from peft_unlearn.tuners.wise.model import routing_margin

    config = pu.WiseConfig()
    held, kept_facts = held_out_people(world)
    asked = {"edited": [f.question for f in world.forget_facts], "unrelated": asked_prompts(held),
             "paraphrase": [f.paraphrase for f in world.forget_facts], "kept": [f.question for f in kept_facts]}
    batches = {name: tokenize_prompts(tokenizer, prompts, padding_side="right") for name, prompts in asked.items()}
    rows = []
    for layer in range(num_decoder_layers(base)):
        module = base.get_submodule(mlp_output_projection_name(base, layer))
        seen = {"x": module, "main": module}
        io = {}
        for name, batch in batches.items():
            with torch.no_grad():
                got = capture_at_positions(base, seen, batch.model_inputs, None,
                                           capture={"x": "input", "main": "output"})
            io[name] = (got["x"].float(), got["main"].float(), batch.attention_mask.bool())

        def scores(delta, name):
            x, main, valid = io[name]
            return sequence_scores(x, delta, main, valid)

        generator = torch.Generator().manual_seed(0)
        shape = (io["edited"][1].shape[-1], io["edited"][0].shape[-1])  # [out, in], as a side memory
        delta = (1e-3 * torch.randn(shape, generator=generator)).requires_grad_(True)
        optimizer = torch.optim.Adam([delta], lr=1e-2)
        for _ in range(steps):
            loss = routing_margin(scores(delta, "edited"), scores(delta, "unrelated"), config)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            paraphrase, kept = scores(delta, "paraphrase"), scores(delta, "kept")
            wise_threshold = config.act_ratio * scores(delta, "edited").min()
            oracle = torch.quantile(kept, 0.98)
        rows.append({"arch": arch, "layer": layer, "margin_loss": float(loss.detach()),
                     "paraphrases_routed": float((paraphrase > wise_threshold).float().mean()),
                     "kept_routed": float((kept > wise_threshold).float().mean()),
                     "paraphrases_routed_oracle": float((paraphrase > oracle).float().mean())})
    return rows


def perfect_router_bound(arch: str, world, base, tokenizer) -> list[dict]:
    """Per MLP output projection, the most a perfect router could give: a side memory fit to the 50 refusals alone
    (margins that never bind, 300 steps, every entry trainable) with every prompt sent through it. Its generation
    match on the paraphrases bounds what any router can reach with WISE's side memory on these models; with the
    library's phrasings (one per question) and with one refusal text for all 50, for which the paraphrases need
    no phrasing tied to each person."""
    from unittest import mock

    import torch
    from peft import get_peft_model

    import peft_unlearn as pu
    from peft_unlearn.capture import num_decoder_layers
    from peft_unlearn.evaluation import refusal_rate
    from peft_unlearn.metrics import generation_match

    rows = []
    for refusal, layer in itertools.product((None, ONE_REFUSAL), range(num_decoder_layers(base))):
        requests, targets, paraphrases = refusal_edits(world, refusal)
        config = pu.WiseConfig(layer=layer, n_iter=300, mask_ratio=1.0)
        model = get_peft_model(copy.deepcopy(base), config)
        # The margin loss switched off (no allowed alpha, beta, gamma make it zero): nothing but the refusals to fit.
        # One unrelated prompt only so that none is generated; it has no effect on the fit.
        with mock.patch("peft_unlearn.tuners.wise.model.routing_margin", lambda *_: torch.zeros(())):
            pu.edit(model, tokenizer, requests, progress=False, unrelated=[world.retain_facts[0].question])
        rows.append({"arch": arch, "refusal": "one text" if refusal else "per question", "layer": layer,
                     "forced_gen_edited": forced(model, lambda: generation_match(model, tokenizer, targets)),
                     "forced_gen_paraphrase": forced(model, lambda: generation_match(model, tokenizer, paraphrases)),
                     "forced_refusal_paraphrase": forced(model, lambda: refusal_rate(model, tokenizer, paraphrases))})
    return rows


WIDER_MODEL = dict(hidden_size=256, num_layers=8, num_heads=8, intermediate_size=1024)


def wider_model_router() -> None:
    """The learned-router probe on a llama fact model twice as wide and deep (about 20 minutes to train once)."""
    from peft_unlearn.testing import fact_world

    world = fact_world()
    base, tokenizer = world.train_model("llama", progress=True, **WIDER_MODEL)
    rows = learned_router("llama", world, base, tokenizer)
    print(table(rows, list(rows[0])))
    print("written to", write_json("wise_facts_wider", {"model": WIDER_MODEL, "learned_router": rows}))


# Three more ways to ask each relation, for a fact model that learns every fact in five phrasings (the two of the
# fixture, question and paraphrase, plus these), as facts are met in many phrasings in pretraining.
MORE_PHRASINGS = {
    "birthplace": ("Name the town where {s} was born.", "{s} was born in which town?",
                   "Tell me the birthplace of {s}."),
    "occupation": ("Name the job of {s}.", "{s} works as what?", "Tell me the occupation of {s}."),
    "instrument": ("Name the instrument of {s}.", "{s} plays which instrument?", "Tell me the instrument {s} plays."),
    "pet": ("Name the pet of {s}.", "{s} keeps which pet?", "Tell me the pet that {s} keeps."),
    "colour": ("Name the colour {s} loves.", "{s} likes which colour most?", "Tell me the favourite colour of {s}."),
    "employer": ("Name the employer of {s}.", "{s} works for which company?", "Tell me the company {s} works for."),
    "food": ("Name the dish {s} loves.", "{s} enjoys which food most?", "Tell me the favourite food of {s}."),
    "sport": ("Name the sport of {s}.", "{s} plays which sport?", "Tell me the sport {s} plays."),
}


def more_phrasings_model() -> None:
    """The probes and two 50-edit settings on a llama fact model trained on every fact in five phrasings (about 5
    minutes to train once): does a model whose facts are less tied to one question form let WISE transfer?"""
    from peft_unlearn.testing import fact_world, train_fact_model

    world = fact_world()
    pairs = world.training_pairs + [
        (phrasing.format(s=f.subject), f.answer) for f in world.facts for phrasing in MORE_PHRASINGS[f.relation]
    ]
    base, tokenizer = train_fact_model(pairs, "llama", seed=world.seed, progress=True)
    results = {
        "perfect_router": perfect_router_bound("llama", world, base, tokenizer),
        "oracle_key_routing": oracle_key_routing("llama", world, base, tokenizer),
        "learned_router": learned_router("llama", world, base, tokenizer),
        "rows": [fifty_edits("llama", world, base, tokenizer, kind) for kind in ("own text", "other people")],
    }
    for name, rows in results.items():
        print(name)
        print(table(rows, list(rows[0])))
    print("written to", write_json("wise_facts_phrasings", {"more_phrasings": MORE_PHRASINGS, **results}))


def main() -> None:
    from peft_unlearn.testing import fact_world

    if "--wider" in sys.argv:
        wider_model_router()
        return
    if "--phrasings" in sys.argv:
        more_phrasings_model()
        return
    if "--one-by-one" in sys.argv:
        rows, world = [], fact_world()
        for arch in ("llama", "gpt2"):
            base, tokenizer = world.train_model(arch, progress=False)
            for rehearse_edits in (0, 50):
                rows.append(one_edit_per_call(arch, world, base, tokenizer, rehearse_edits))
                print(table(rows[-1:], list(rows[-1])), flush=True)
        print("written to", write_json("wise_facts_one_by_one", {"rows": rows}))
        return
    world = fact_world()
    rows, probe, learned, bound = [], [], [], []
    for arch in ("llama", "gpt2"):
        base, tokenizer = world.train_model(arch, progress=False)
        probe += oracle_key_routing(arch, world, base, tokenizer)
        bound_here = perfect_router_bound(arch, world, base, tokenizer)
        bound += bound_here
        print(table(bound_here, list(bound_here[0])), flush=True)
        learned_here = learned_router(arch, world, base, tokenizer)
        learned += learned_here
        print(table(learned_here, list(learned_here[0])), flush=True)
        for kind in ("own text", "neighbours", "other people", "all kept people"):
            rows.append(fifty_edits(arch, world, base, tokenizer, kind))
            print(table(rows[-1:], list(rows[-1])), flush=True)
        for statistics_from in ("other people", "all kept people"):
            rows.append(alphaedit_fifty_edits(arch, world, base, tokenizer, statistics_from))
            print(table(rows[-1:], list(rows[-1])), flush=True)
        for retrieve in (False, True):
            rows.append(sequential(arch, world, base, tokenizer, retrieve))
            print(table(rows[-1:], list(rows[-1])), flush=True)
    columns = ["arch", "setting", "edits_per_second", "gen_edited", "gen_paraphrase", "refusal_paraphrase",
               "kept_facts", "kept_before", "kept_after", "routed_edited", "routed_paraphrase", "routed_kept",
               "forced_gen_edited", "forced_kept", "gen_first_50", "gen_last_50"]
    print(table(rows, columns))
    print("oracle nearest-key routing (threshold routes <= 2% of kept-fact questions):")
    print(table(probe, ["arch", "layer", "keys", "paraphrases_routed", "kept_routed"]))
    print("WISE-form router trained on routing alone (held-out people as unrelated prompts):")
    print(table(learned, ["arch", "layer", "margin_loss", "paraphrases_routed", "kept_routed",
                          "paraphrases_routed_oracle"]))
    print("perfect router (side memory fit alone, every prompt forced through it):")
    print(table(bound, ["arch", "refusal", "layer", "forced_gen_edited", "forced_gen_paraphrase",
                        "forced_refusal_paraphrase"]))
    results = {"rows": rows, "oracle_key_routing": probe, "learned_router": learned, "perfect_router": bound}
    print("written to", write_json("wise_facts", results))


if __name__ == "__main__":
    main()
