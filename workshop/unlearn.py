"""`obliviate unlearn NAME --forget FILE… --retain FILE… [--dev-prompts FILE]`: from text about a topic
to a profile that forgets it.

1. The inputs are checked before the model loads: enough forget text, retain text that does not
   repeat it, dev prompts with a `forget` and a `generic` set.
2. The SAE's features are ranked by the ceiling method (discover.py): how often a feature fires on the
   forget text above the highest activation it reaches on any retain set (each file judged on its own,
   plus Wikipedia summaries), or on all but the n retain texts it peaks highest in (n in OUTLIERS); that
   activation becomes its `fires_above`. Each forget file is a topic, ranked on its own, so one profile
   can forget several topics (one intervention, every topic's features).
3. Candidates, the recipe of the shipped `hp_unlearn`: the top k features of each topic (k in KS, for
   each n), clamped negative for the rest of the sequence once one fires, SAE error kept. Each is served and
   scored on the dev prompts (greedy answers per set) and on cross-entropy over held-out text (the
   held-out documents after those the loss report reads).
4. The candidate with the fewest forget answers among those keeping generic >= 95% and nearby >= 80% of
   baseline's answers and adding <= 2% loss (on a tie, the one with fewer features, then the stricter
   threshold, then the more fluent forget completions) is written as NAME.yaml, with its numbers in the notes.
   Without dev prompts: the largest k within the loss bound.

`--steer-replies FILE` adds a steering direction to the candidates (workshop/steer.py): from the model's own
answers to the forget dev prompts towards the replies in FILE (what it would say not knowing), added from the
trigger on at each `--steer-scales` fraction of the gap; scored and chosen by the same rules.

`--method rmu|graddiff` makes the fine-tuned comparators the same way: a LoRA adapter is trained on the
same forget and retain text (workshop/finetune.py), its candidates are the adapter at several strengths
(`--scales` of its update), and they are served, scored and chosen by the same rules.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

from ablation.sae_io import load_sae, save_direction
from ablation.spec import ProfileMetadata, ProfileSpec, Steer, default_profiles_dir
from evals.cli import run_reports
from evals.common import md_table
from server.live import LiveServer
from server.settings import Settings
from workshop.corpus import wiki_summaries
from workshop.discover import FeatureScore, clamp_profile, feature_acts, layer_of, rank, retain_sets
from workshop.inputs import SETS, Inputs, UnlearnError
from workshop.recipe import CONDITION, DEV_DOCS, GENERATED, GENERIC_RETAIN, KS, MARKUP_GUARD, OUTLIERS, Goals
from workshop.finetune import AdapterConfig, Trained, scaled_copy, train
from workshop.scoring import Scores, score
from workshop.steer import Direction, direction

EDITS = {"sequence": "clamped negative for the rest of the sequence once one fires",
         "sequence_active": "clamped negative, once one fires, wherever each is active",
         "token": "clamped negative where each fires", "always": "set to their values everywhere"}
GENERATED_EDITS = {"same": "", "zero": "; in generated text they are zeroed instead of clamped",
                   "off": "; generated text is left unedited"}


@dataclass(frozen=True)
class Candidate:
    """One profile tried: the top k features of each topic, thresholds leaving out `outliers` retain texts,
    clamp values `scale` x each feature's mean activation, steered `steer` x the steering gap (0: not)."""
    name: str
    spec: ProfileSpec
    k: int
    outliers: int = 0
    scale: float = 1.0
    steer: float = 0.0


@dataclass(frozen=True)
class Outcome:
    """A served profile's dev scores and the loss it adds (%) against baseline; candidate None: baseline."""
    scores: Scores
    loss_pct: float = 0.0
    candidate: Candidate | None = None

    def answers(self, s: str) -> int:
        return self.scores.answers[s]


@dataclass
class UnlearnRun:
    """Everything `run` measured and what it chose (None: no candidate met the goals; `why` says each's miss)."""
    sae: str
    hookpoint: str
    outcomes: dict[str, Outcome]  # baseline first, then every candidate
    chosen: str | None
    why: dict[str, str] = field(default_factory=dict)
    ks: list[int] = field(default_factory=list)
    outliers: list[int] = field(default_factory=list)
    scales: list[float] = field(default_factory=list)
    goals: Goals = Goals()
    trained: Trained | None = None  # the fine-tuned methods: the adapter the candidates scale
    steers: list[float] = field(default_factory=list)
    direction: Direction | None = None  # --steer-replies: the direction the candidates add

    @property
    def baseline(self) -> Outcome:
        return self.outcomes["baseline"]


def choose(outcomes: dict[str, Outcome], candidates: list[str],
           goals: Goals = Goals()) -> tuple[str | None, dict[str, str]]:
    """-> (the chosen candidate or None, why each other one was passed over)."""
    base, base_fluency = outcomes["baseline"].scores.answers, outcomes["baseline"].scores.fluency
    why: dict[str, str] = {}
    ok = []
    for c in candidates:
        o = outcomes[c]
        fails = [f"loss +{o.loss_pct:.2f}%"] if o.loss_pct > goals.loss_pct else []
        for s in ("generic", "nearby"):
            if base.get(s) and o.answers(s) < getattr(goals, s) * base[s]:
                fails.append(f"{s} {o.answers(s)}/{base[s]}")
        if base_fluency is not None and o.scores.fluency is not None \
                and o.scores.fluency < base_fluency - goals.fluency_drop:
            fails.append(f"fluency {o.scores.fluency:.2f} vs {base_fluency:.2f}")
        if fails:
            why[c] = ", ".join(fails)
        else:
            ok.append(c)
    if not ok:
        return None, why
    if "forget" in base:
        # ties go to fewer features, then to the stricter threshold: the dev prompts cannot tell them apart, and
        # each feature more (or outlier allowed) is one more chance to switch the clamp on in unseen generic text;
        # then to the more fluent forget completions (a weaker clamp, --scales, that forgets as much)
        best = min(ok, key=lambda c: (outcomes[c].answers("forget"), outcomes[c].candidate.k,
                                      outcomes[c].candidate.outliers, -(outcomes[c].scores.fluency or 0.0),
                                      outcomes[c].candidate.steer))
    else:
        best = max(ok, key=lambda c: outcomes[c].candidate.k)
    return best, why


def serving(lm, profiles_dir: Path):
    """A loopback server (real HTTP) of `lm` with the shipped profiles and those in `profiles_dir`."""
    return LiveServer(Settings(profiles=[default_profiles_dir(), profiles_dir]), lm)  # the app loads the profiles


def report(lm, name: str, profiles_dir: Path, topics: str, out: Path, limit: int | None = None,
           chat: bool = False) -> Path:
    """Every eval report for `baseline` and NAME on the topics' test split, against a loopback server."""
    with serving(lm, profiles_dir) as srv:
        asyncio.run(run_reports(srv.url, [name], out, topic=topics, baseline="baseline", limit=limit, chat=chat))
    return out / "index.md"


def top_of_each(rankings: list[list[FeatureScore]], k: int) -> list[FeatureScore]:
    """The top k features of each topic's ranking, each feature once (where two topics share one, the
    first topic's row: its clamp value)."""
    out: dict[int, FeatureScore] = {}
    for ranking in rankings:
        for r in ranking[:k]:
            out.setdefault(r.feature, r)
    return list(out.values())


def run(lm, name: str, inputs: Inputs, sae_ref: str, work: Path, n_docs: int = DEV_DOCS,
        n_wiki: int = GENERIC_RETAIN, scales: tuple[float, ...] = (1.0,), ks: tuple[int, ...] = KS,
        outliers: tuple[int, ...] = OUTLIERS, goals: Goals = Goals(), condition: str = CONDITION,
        generated: str = GENERATED, markup_guard: bool = MARKUP_GUARD,
        steer: tuple[list[str], tuple[float, ...]] | None = None) -> UnlearnRun:
    """Ranks, writes (into `work`), serves and scores the candidates, and chooses one. steer: (replacement
    replies, fractions of the steering gap to try; 0: no steering) — needs dev prompts with a forget set."""
    sae = load_sae(sae_ref)
    hook = sae.cfg.metadata.hook_name
    layer = layer_of(hook)
    retain = [feature_acts(lm, sae, t, layer) for t in retain_sets(inputs.retain, n_wiki)]
    forget = [feature_acts(lm, sae, texts, layer) for texts in inputs.forget]
    rankings = {n: [rank(f, retain, "ceiling", top=max(ks), outliers=n) for f in forget] for n in outliers}
    if not all(rankings[min(outliers)]):
        which = " (forget file " + ", ".join(str(i + 1) for i, r in enumerate(rankings[min(outliers)]) if not r) + ")"
        raise UnlearnError(f"no feature of {sae_ref} fires on the forget text{which if len(forget) > 1 else ''} "
                           f"above its highest activation on the retain text: give more (or more specific) forget "
                           f"text, retain text further from the topic, or another SAE (--sae) trained on text that "
                           f"contains the topic (`obliviate sae train --topic FILE`)")
    candidates: dict[str, Candidate] = {}
    work.mkdir(parents=True, exist_ok=True)
    found, steers, steer_path = None, [0.0], None
    if steer:
        if not (inputs.dev or {}).get("forget"):
            raise UnlearnError("--steer-replies needs --dev-prompts with a forget set: the direction starts from "
                               "the model's own answers to them")
        replies, steers = steer[0], sorted(set(steer[1]))
        found = direction(lm, layer, [it["prompt"] for it in inputs.dev["forget"]], replies, inputs.chat)
        steer_path = work / "steer.safetensors"
        save_direction(found.vector, steer_path)
    for n in outliers:
        for k in sorted({min(k, max(map(len, rankings[n]))) for k in ks}):
            chosen = top_of_each(rankings[n], k)
            for scale in scales:
                for v in steers:
                    cand = f"{name}__k{k}" + (f"_o{n}" if len(outliers) > 1 else "") + \
                        (f"_s{scale:g}" if len(scales) > 1 else "") + (f"_v{v:g}" if len(steers) > 1 else "")
                    spec = clamp_profile(cand, lm.name, sae_ref, hook, chosen, True, condition, scale, cand,
                                         generated=generated, markup_guard=markup_guard)
                    if v:
                        iv = spec.interventions[0].model_copy(update={
                            "steer": Steer(vector=str(steer_path), scale=round(v * found.gap, 3))})
                        spec = spec.model_copy(update={"interventions": [iv]})
                    candidates[cand] = Candidate(cand, spec, k, n, scale, v)
    outcomes, chosen, why = evaluate(lm, work, candidates, inputs, n_docs, goals)
    return UnlearnRun(sae_ref, hook, outcomes, chosen, why, sorted({c.k for c in candidates.values()}),
                      list(outliers), list(scales), goals, steers=steers, direction=found)


def evaluate(lm, work: Path, candidates: dict[str, Candidate], inputs: Inputs, n_docs: int,
             goals: Goals) -> tuple[dict[str, Outcome], str | None, dict[str, str]]:
    """Writes the candidates' profiles into `work`, serves and scores them beside baseline, and chooses."""
    for name, c in candidates.items():
        (work / f"{name}.yaml").write_text(c.spec.to_yaml())
    with serving(lm, work) as srv:
        scores = asyncio.run(score(srv.url, ["baseline", *candidates], inputs.dev or {}, n_docs, inputs.chat))
    base_ce = scores["baseline"].ce
    outcomes = {p: Outcome(s, 100 * (s.ce - base_ce) / base_ce, candidates.get(p)) for p, s in scores.items()}
    chosen, why = choose(outcomes, list(candidates), goals)
    return outcomes, chosen, why


def run_finetuned(lm, name: str, inputs: Inputs, work: Path, cfg: AdapterConfig, scales: tuple[float, ...],
                  n_docs: int = DEV_DOCS, n_wiki: int = GENERIC_RETAIN, goals: Goals = Goals()) -> UnlearnRun:
    """Trains the adapter (on every forget file together; retain: the files + Wikipedia summaries), then
    serves, scores and chooses among its strengths."""
    work.mkdir(parents=True, exist_ok=True)
    retain = [t for texts in inputs.retain for t in texts] + [t for _, t in wiki_summaries("train")[:n_wiki]]
    trained = train(lm, [t for texts in inputs.forget for t in texts], retain, work / "adapter", cfg)
    candidates = {}
    for scale in scales:
        cand = f"{name}__s{scale:g}"
        path = scaled_copy(trained.path, work / f"{cand}.adapter", scale)
        spec = ProfileSpec(name=cand, model=lm.name, adapter=str(path),
                           description=f"{cfg.method} adapter at {scale:g}x its trained strength")
        candidates[cand] = Candidate(cand, spec, 0, 0, scale)
    outcomes, chosen, why = evaluate(lm, work, candidates, inputs, n_docs, goals)
    return UnlearnRun(cfg.method, "", outcomes, chosen, why, [], [], list(scales), goals, trained)


def edit_words(iv) -> str:
    """What an intervention does to its features, in words (all values 0: zeroed, not clamped)."""
    if all(e.value == 0 for e in iv.edits):
        return EDITS[iv.condition].replace("clamped negative", "zeroed").replace("set to their values", "zeroed")
    return EDITS[iv.condition] + GENERATED_EDITS[iv.generated]


def final_profile(name: str, result: UnlearnRun, inputs: Inputs) -> ProfileSpec:
    """The chosen candidate under its own name, with how it was chosen in its notes."""
    o, base = result.outcomes[result.chosen], result.baseline
    c = o.candidate
    dev = ", ".join(f"{s} {o.answers(s)}/{base.answers(s)} of baseline's" for s in SETS
                    if s in base.scores.answers) or "no dev prompts"
    if o.scores.fluency is not None and base.scores.fluency is not None:
        dev += (f"; forget completions' fluency {o.scores.fluency:.2f} nats/token (baseline's "
                f"{base.scores.fluency:.2f})")
    sources = (f"forget: {' + '.join(str(len(t)) for t in inputs.forget)} texts; retain: "
               f"{sum(map(len, inputs.retain))} texts in {len(inputs.retain)} files + Wikipedia")
    if result.trained:
        t = result.trained
        description = (f"{name}: a LoRA adapter trained by {t.config.method} to unlearn the forget text, at "
                       f"{c.scale:g}x its trained strength. Made by `obliviate unlearn --method {t.config.method}`.")
        notes = (f"Chosen from strengths {result.scales} ({sources}). Dev answers: {dev}; loss added "
                 f"{o.loss_pct:+.2f}% (CE on held-out Wikipedia summaries). Goals: {result.goals}. Training: "
                 + t.notes())
        return c.spec.model_copy(update={"name": name, "description": description,
                                         "metadata": ProfileMetadata(version=1, notes=notes)})
    iv = c.spec.interventions[0]
    each = f" of each of the {len(inputs.forget)} forget topics" if len(inputs.forget) > 1 else ""
    left_out = f" once the {c.outliers} retain texts where each peaks highest are left out" if c.outliers else ""
    description = (f"{name}: the top {c.k} features{each} of {result.sae} that fire on the forget text "
                   f"above their highest activation on the retain text{left_out} "
                   f"({len(iv.edits)} features), {edit_words(iv)} (SAE error kept)" + ("; tag tokens are not sampled once the edit is on" if c.spec.markup_guard else "") +
                   (f"; from the trigger on, the residual is steered {c.steer:g}x the gap from its own answers "
                    f"towards {result.direction.replies} replies of a model that does not know" if c.steer else "") +
                   ". Made by `obliviate unlearn`.")
    chosen_from = f"k in {result.ks}" + "".join(f" and {what} in {getattr(result, what)}" for what in
                                                ("outliers", "scales", "steers") if len(getattr(result, what)) > 1)
    notes = (f"Chosen from {chosen_from} (ceiling ranking; {sources}). Dev answers: {dev}; "
             f"loss added {o.loss_pct:+.2f}% (CE on held-out Wikipedia summaries). Goals: {result.goals}. "
             f"Features: " + c.spec.metadata.notes)
    return c.spec.model_copy(update={"name": name, "description": description,
                                     "metadata": ProfileMetadata(version=1, notes=notes)})


def summary(result: UnlearnRun) -> str:
    base = result.baseline.scores.answers
    sets = [s for s in SETS if s in base]
    chosen = result.outcomes.get(result.chosen)
    warn = ""
    if chosen and base.get("forget") and chosen.answers("forget") > 0.5 * base["forget"]:
        warn = (f"\nwarning: the best candidate still answers {chosen.answers('forget')}/{base['forget']} of "
                f"baseline's forget prompts: the SAE may have few features for this topic (its training text must "
                f"contain the topic: `obliviate sae train --topic FILE`), or try larger --scales")
    cell = lambda v: "—" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)  # noqa: E731
    header = ["profile", "scale" if result.trained else "k", *sets] + (["forget fluency"] if "forget" in base else []) + ["CE", "loss added", ""]
    rows = []
    for p, o in result.outcomes.items():
        mark = "chosen" if p == result.chosen else result.why.get(p, "")
        knob = (o.candidate.scale if result.trained else o.candidate.k) if o.candidate else 0
        rows.append([p, knob, *(o.answers(s) for s in sets)] +
                    ([cell(o.scores.fluency)] if "forget" in base else []) +
                    [f"{o.scores.ce:.4f}", f"{o.loss_pct:+.2f}%", mark])
    return md_table(header, rows).rstrip("\n") + warn
