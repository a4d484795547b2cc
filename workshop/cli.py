"""`obliviate sae train`, `obliviate features discover|show` and `obliviate unlearn`: arguments, checks and
one-line errors."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from clients.http import APIError
from evals.attacks import GCG_FILE
from evals.common import EvalError, Topics, load_jsonl
from server.cli import comma_list
from server.errors import CLIError
from workshop.corpus import DATA, FICTION, CorpusError, read_texts
from workshop.inputs import UnlearnError, read_files, read_inputs
from workshop.recipe import (ADAPTER_SCALES, CONDITION, DEV_DOCS, GENERATED, GENERIC_RETAIN, KS, MARKUP_GUARD, METHODS,
                             OUTLIERS, AdapterConfig, Goals)


def add_sae(sub) -> None:
    p = sub.add_parser("sae", help="train the served model's own SAE")
    ssub = p.add_subparsers(dest="sae_command", required=True, parser_class=type(p))
    t = ssub.add_parser("train", help="train a TopK SAE with sae_lens (resumable; deterministic with --seed)")
    t.add_argument("--model", default="gemma-3-270m")
    t.add_argument("--layers", type=comma_list(int), default=[6, 9],
                   help="layers to compare; the best ships (default 6,9)")
    t.add_argument("--width", type=int, default=4096)
    t.add_argument("--k", type=int, default=32)
    t.add_argument("--generic-tokens", type=int, default=800_000)
    t.add_argument("--topic", type=Path, action="append",
                   help="text about a topic the SAE must have features for: .txt (one text a line) or .jsonl "
                        "(text); repeatable (default: the shipped Harry Potter text)")
    t.add_argument("--sample-prompts", type=Path, action="append",
                   help="prompts about the topics (.txt one a line, or .jsonl prompt) whose sampled continuations "
                        "join the topic text; repeatable (default: the shipped Harry Potter openings)")
    t.add_argument("--topic-repeat", type=int, default=4, help="times the topic text is repeated in the mix")
    t.add_argument("--samples-per-prompt", type=int, default=4)
    t.add_argument("--epochs", type=int, default=2)
    t.add_argument("--eval-docs", type=int, default=120)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--ship-layer", type=int, help="ship this layer instead of the rule's pick")
    t.add_argument("--name", help="the SAE folder's name (default MODEL-res-L<layer>)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", type=Path, default=Path("saes"),
                   help="where the SAE folder is written (default ./saes; the shipped one is ablation/saes)")
    t.add_argument("--work-dir", type=Path, default=Path.home() / ".cache" / "obliviate" / "sae-train")
    t.set_defaults(func=cmd_sae_train)


def cmd_sae_train(args) -> int:
    # deferred: the command line answers --help and bad arguments before torch and the model stack load
    from workshop import train

    files = {}
    for flag, paths, what in (("topic_files", args.topic, "topic"), ("prompt_files", args.sample_prompts, "prompt")):
        if paths:
            try:
                read_files(paths, what)  # every file exists and holds text
            except UnlearnError as e:
                raise CLIError(str(e)) from None
            files[flag] = [str(p) for p in paths]
    cfg = train.TrainConfig(layers=args.layers, width=args.width, k=args.k, generic_tokens=args.generic_tokens,
                      topic_repeat=args.topic_repeat, samples_per_prompt=args.samples_per_prompt, epochs=args.epochs,
                      seed=args.seed, eval_docs=args.eval_docs, lr=args.lr, **files)
    if not cfg.layers or min(cfg.layers) < 0 or cfg.width < 1 or not 0 < cfg.k <= cfg.width or cfg.topic_repeat < 0:
        raise CLIError("need --layers ≥ 0, --width ≥ 1, 0 < --k ≤ --width and --topic-repeat ≥ 0")
    if args.name is not None and not re.fullmatch(r"[A-Za-z0-9_.-]{1,96}", args.name):
        raise CLIError(f"--name {args.name!r}: use letters, digits, _ . - (at most 96)")
    if args.ship_layer is not None and args.ship_layer not in cfg.layers:
        raise CLIError(f"--ship-layer {args.ship_layer} is not one of --layers {cfg.layers}")
    try:
        card = train.run(cfg, args.model, args.out, args.work_dir / train.mix_key(cfg, args.model), args.ship_layer,
                         args.name)
    except CorpusError as e:
        raise CLIError(str(e)) from None
    print(json.dumps({k: v for k, v in card.items() if k not in ("config", "compared")}, indent=2))
    return 0


def add_features(sub) -> None:
    p = sub.add_parser("features", help="find and inspect SAE features for a topic")
    fsub = p.add_subparsers(dest="features_command", required=True, parser_class=type(p))
    for name in ("discover", "show"):
        q = fsub.add_parser(name, help="rank features: forget vs retain text" if name == "discover"
                            else "print the top contexts of features")
        q.add_argument("--model", default="gemma-3-270m")
        q.add_argument("--sae", help="SAE directory or release:sae_id (default: the shipped SAE)")
        q.add_argument("--hookpoint", help="default: the SAE's own hook_name")
        q.add_argument("--contexts", type=int, default=3, help="contexts to print per feature")
        if name == "show":
            q.add_argument("ids", type=int, nargs="+")
            q.add_argument("--texts", type=Path, action="append", help="text files to search (default: forget + retain)")
            q.set_defaults(func=cmd_features_show)
            continue
        q.add_argument("--forget", type=Path, action="append", help=".txt (one text a line) or .jsonl")
        q.add_argument("--retain", type=Path, action="append",
                       help="retain set (repeatable; each file is judged on its own; default: the shipped other "
                            "fiction as one set)")
        q.add_argument("--generic-retain", type=int, default=300, help="also retain N Wikipedia summaries (0: none)")
        q.add_argument("--method", choices=["dsg", "firing", "ceiling"], default="dsg")
        q.add_argument("--top", type=int, default=20)
        q.add_argument("--min-ratio", type=float, default=5.0, help="dsg: mean(forget)/mean(retain) floor")
        q.add_argument("--max-retain-rate", type=float, default=0.01, help="firing: retain firing-rate ceiling")
        q.add_argument("--write-profile", type=Path, help="write a profile YAML with the top --k features")
        q.add_argument("--profile-name", default="hp_unlearn")
        q.add_argument("--k", type=int, default=3)
        q.add_argument("--keep-error", action=argparse.BooleanOptionalAction, default=True)
        q.add_argument("--condition", choices=["always", "token", "sequence", "sequence_active"], default="token")
        q.add_argument("--value-scale", type=float, default=1.0,
                       help="clamp to -scale x the feature's mean activation where active (0: zero-ablate)")
        q.add_argument("--fires-above", type=float, default=0.0,
                       help="token/sequence: a feature counts as active only above this fraction of its mean "
                            "activation (method ceiling: above its highest activation on retain text)")
        q.add_argument("--json", type=Path, help="write the ranking as JSON")
        q.set_defaults(func=cmd_features_discover)


def _sae(args):
    # deferred: the command line answers --help and bad arguments before torch and the model stack load
    from ablation.sae_io import SAELoadError, load_sae, shipped_sae
    from workshop.discover import layer_of

    try:
        ref = args.sae or shipped_sae(args.model)
        sae = load_sae(ref)
        hookpoint = args.hookpoint or sae.cfg.metadata.hook_name
        return sae, ref, hookpoint, layer_of(hookpoint)
    except (SAELoadError, ValueError) as e:
        raise CLIError(str(e)) from None


def _model(args):
    # deferred: the command line answers --help and bad arguments before torch and the model stack load
    from models.loading import ModelLoadError, load_model

    try:
        return load_model(args.model, device="cpu", dtype="float32")
    except ModelLoadError as e:
        raise CLIError(str(e)) from None


def _texts(paths, default: list[Path]) -> list[str]:
    out = []
    for p in paths or default:
        if not Path(p).exists():
            raise CLIError(f"{p}: file not found")
        out += read_texts(p)
    return out


def cmd_features_discover(args) -> int:
    # deferred: the command line answers --help and bad arguments before torch and the model stack load
    from workshop.discover import clamp_profile, feature_acts, rank, retain_sets, top_contexts

    if args.fires_above < 0 or args.k < 1:
        raise CLIError("need --fires-above ≥ 0 and --k ≥ 1")
    forget = _texts(args.forget, [DATA / "hp_topic.txt"])
    try:
        given = [_texts([p], []) for p in args.retain or []] or [_texts(FICTION, [])]
        sets = retain_sets(given, args.generic_retain)
    except CorpusError as e:
        raise CLIError(str(e)) from None
    sae, ref, hookpoint, layer = _sae(args)
    lm = _model(args)
    fa, ra = feature_acts(lm, sae, forget, layer), [feature_acts(lm, sae, t, layer) for t in sets]
    ranking = rank(fa, ra, args.method, args.min_ratio, args.max_retain_rate, args.top)
    contexts = {r.feature: top_contexts(fa, lm.tokenizer, forget, r.feature, args.contexts) for r in ranking}
    print(f"{len(forget)} forget texts ({fa.acts.shape[0]} tokens), {len(sets)} retain sets "
          f"({', '.join(str(r.acts.shape[0]) for r in ra)} tokens; each feature judged by the set it fires on "
          f"most); {args.method} ranking at {hookpoint}")
    for r in ranking:
        print(f"\n#{r.feature:>5}  score {r.score:.4g}  mean forget/retain {r.mean_forget:.3g}/{r.mean_retain:.3g} "
              f"(x{r.ratio:.1f})  fires forget/retain {r.rate_forget:.1%}/{r.rate_retain:.2%}  max on retain "
              f"{r.max_retain:.3g}")
        for c in contexts[r.feature]:
            print(f"    {c['act']:7.2f}  {c['context']!r}")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) | {"contexts": contexts[r.feature]} for r in ranking], indent=2))
    if args.write_profile:
        active = ("active = above its highest activation on retain text" if args.method == "ceiling"
                  else f"active = above {args.fires_above} x its mean activation")
        note = (f"Top {args.k} {args.method}-ranked features of {ref} at {hookpoint} (forget: "
                f"{len(forget)} texts; retain: {sum(map(len, sets))} texts), clamped to -{args.value_scale} x mean "
                f"activation where active ({active}); keep_error={args.keep_error}, condition={args.condition}.")
        args.write_profile.write_text(clamp_profile(args.profile_name, args.model, ref, hookpoint, ranking[: args.k],
                                                    args.keep_error, args.condition, args.value_scale, note,
                                                    args.fires_above).to_yaml())
        print(f"\nwrote {args.write_profile}")
    return 0


def cmd_features_show(args) -> int:
    # deferred: the command line answers --help and bad arguments before torch and the model stack load
    from workshop.discover import feature_acts, top_contexts

    sae, ref, hookpoint, layer = _sae(args)
    bad = [i for i in args.ids if not 0 <= i < sae.cfg.d_sae]
    if bad:
        raise CLIError(f"feature ids must be in [0, {sae.cfg.d_sae}); got {bad}")
    texts = _texts(args.texts, [DATA / "hp_topic.txt", *FICTION])
    lm = _model(args)
    fa = feature_acts(lm, sae, texts, layer)
    for i in args.ids:
        col = fa.acts[:, i]
        print(f"#{i} at {hookpoint}: fires on {(col > 0).float().mean():.2%} of {col.numel()} tokens, "
              f"max {col.max():.3g}")
        for c in top_contexts(fa, lm.tokenizer, texts, i, max(args.contexts, 1)):
            print(f"    {c['act']:7.2f}  {c['context']!r}")
    return 0


def add_unlearn(sub) -> None:
    p = sub.add_parser("unlearn", help="from text about a topic to a profile that forgets it (one command)")
    p.add_argument("name", help="the profile's name (written as OUT/NAME.yaml)")
    p.add_argument("--forget", type=Path, action="append", required=True,
                   help="text about the topic: .txt (one text a line) or .jsonl (text); repeatable: each file is "
                        "a topic (its features ranked on their own), so one profile can forget several")
    p.add_argument("--retain", type=Path, action="append", required=True,
                   help="text on what must be kept (nearby topics, other fiction…); repeatable, each judged alone")
    p.add_argument("--dev-prompts", type=Path,
                   help="JSONL {prompt, answers, set: forget|generic|nearby} to choose the profile by")
    p.add_argument("--chat", action="store_true", help="ask the dev prompts (and --report's) as a user's chat "
                   "message, through the model's chat template (a chat model's questions)")
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--method", choices=["sae", *METHODS], default="sae",
                   help="sae: ablate SAE features (default); rmu, graddiff or npo: train a LoRA adapter (the fine-tuned "
                        "comparators, workshop/finetune.py) and choose its strength (--scales) by the same rules")
    p.add_argument("--sae", help="SAE directory or release:sae_id (default: the shipped SAE)")
    p.add_argument("--out", type=Path, default=Path("profiles"), help="where NAME.yaml goes (default ./profiles)")
    p.add_argument("--generic-retain", type=int, default=GENERIC_RETAIN,
                   help=f"Wikipedia summaries added to the retain side (default {GENERIC_RETAIN})")
    p.add_argument("--docs", type=int, default=DEV_DOCS,
                   help=f"held-out documents for the loss (not the loss report's; default {DEV_DOCS})")
    p.add_argument("--ks", type=comma_list(int), default=list(KS), help="how many features of each topic to try "
                   f"(comma-separated; default {','.join(map(str, KS))})")
    p.add_argument("--outliers", type=comma_list(int), default=list(OUTLIERS),
                   help="retain texts a feature may peak above its threshold in, leaving out odd tokens in the "
                        f"Wikipedia summaries (comma-separated, each a candidate; default {','.join(map(str, OUTLIERS))})")
    p.add_argument("--scales", type=comma_list(float), help="sae: clamp values to try, as multiples of each feature's "
                   "mean activation (default 1; 0: zeroed); rmu/graddiff/npo: strengths of the adapter's update to try (default "
                   f"{','.join(map(str, ADAPTER_SCALES))}); comma-separated")
    t = AdapterConfig()
    p.add_argument("--steps", type=int, default=t.steps, help=f"adapters: training steps (default {t.steps})")
    p.add_argument("--lr", type=float, default=t.lr, help=f"adapters: learning rate (default {t.lr})")
    p.add_argument("--rank", type=int, default=t.rank, help=f"adapters: LoRA rank (default {t.rank})")
    p.add_argument("--layer", type=int, default=t.layer, help=f"rmu: the layer misdirected (default {t.layer})")
    p.add_argument("--steer", type=float, default=t.steer,
                   help=f"rmu: the target's norm in mean activation norms (default {t.steer})")
    p.add_argument("--retain-weight", type=float, default=t.retain_weight,
                   help=f"rmu/graddiff/npo: weight of the retain loss (default {t.retain_weight})")
    p.add_argument("--beta", type=float, default=t.beta, help=f"npo: its inverse temperature (default {t.beta})")
    p.add_argument("--condition", choices=["sequence", "sequence_active", "token"], default=CONDITION,
                   help=f"where each candidate clamps (ablation/spec.py; default {CONDITION})")
    p.add_argument("--generated", choices=["same", "zero", "off"], default=GENERATED,
                   help=f"the edit at generated tokens: as in the prompt, zeroing, or none (default {GENERATED})")
    p.add_argument("--markup-guard", action=argparse.BooleanOptionalAction, default=MARKUP_GUARD,
                   help="ban tag tokens once the edit is on (profile field markup_guard; default on)")
    p.add_argument("--steer-replies", type=Path, metavar="FILE",
                   help="sae: replies of a model that does not know the topic, one a line (e.g. "
                        "workshop/data/dont_know_replies.txt); each candidate is also tried steered from its own "
                        "answers towards them from the trigger on (workshop/steer.py; needs --dev-prompts)")
    p.add_argument("--steer-scales", type=comma_list(float), default=[0.0, 0.25, 0.5],
                   help="with --steer-replies: steering strengths to try, as fractions of the gap between the two "
                        "mean residuals (0: no steering; default 0,0.25,0.5)")
    g = Goals()
    p.add_argument("--min-generic", type=float, default=g.generic, help=f"share of baseline's generic dev answers "
                   f"to keep (default {g.generic})")
    p.add_argument("--min-nearby", type=float, default=g.nearby, help=f"share of baseline's nearby dev answers "
                   f"to keep (default {g.nearby})")
    p.add_argument("--max-loss", type=float, default=g.loss_pct, help=f"loss added, %% (default {g.loss_pct})")
    p.add_argument("--max-fluency-drop", type=float, default=g.fluency_drop,
                   help=f"nats/token the forget completions may lose against baseline's (default {g.fluency_drop})")
    p.add_argument("--report", type=Path, metavar="DIR",
                   help="then run every eval report (test split) for baseline and NAME into DIR (needs --topic)")
    p.add_argument("--topic", help="the eval topic(s) for --report: hp, sw, hp,sw or a topic YAML")
    p.add_argument("--report-limit", type=int, help="at most N items per report data set (a quick pass)")
    p.set_defaults(func=cmd_unlearn)


def cmd_unlearn(args) -> int:
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", args.name):
        raise CLIError(f"profile name {args.name!r}: use letters, digits, _ . - (at most 64)")
    scales = tuple(args.scales or ([1.0] if args.method == "sae" else ADAPTER_SCALES))
    ks, outliers = tuple(args.ks), tuple(sorted(set(args.outliers)))
    if args.method != "sae" and (args.steps < 1 or args.lr <= 0 or not 1 <= args.rank <= 64
                                 or args.steer <= 0 or args.retain_weight < 0 or args.beta <= 0):
        raise CLIError("need --steps ≥ 1, --lr > 0, --rank in [1, 64] (the largest served), --steer > 0, "
                       "--retain-weight ≥ 0 and --beta > 0")
    lowest = 0 if args.method == "sae" else 1e-9  # sae: 0 zeroes the features (with --steer-replies, steering alone)
    if args.docs < 1 or args.generic_retain < 0 or not scales or min(scales) < lowest or not ks or min(ks) < 1 \
            or not outliers or min(outliers) < 0:
        raise CLIError("need --docs ≥ 1, --generic-retain ≥ 0, --ks ≥ 1, --outliers ≥ 0 and --scales > 0 (≥ 0 for "
                       "--method sae: 0 zeroes the features)")
    if not (0 <= args.min_generic <= 1 and 0 <= args.min_nearby <= 1) or args.max_loss < 0 \
            or args.max_fluency_drop < 0:
        raise CLIError("need --min-generic and --min-nearby in [0, 1], --max-loss ≥ 0 and --max-fluency-drop ≥ 0")
    goals = Goals(args.min_generic, args.min_nearby, args.max_loss, args.max_fluency_drop)
    if args.markup_guard and not args.condition.startswith("sequence"):
        raise CLIError(f"--markup-guard switches on with a sequence edit: give --condition sequence (or "
                       f"sequence_active), or --no-markup-guard with --condition {args.condition}")
    if args.report and not args.topic:
        raise CLIError("--report needs --topic: the eval topic's prompts and lexicon (hp, sw, hp,sw or a topic YAML)")
    if args.steer_replies and (args.method != "sae" or not args.dev_prompts or not args.steer_scales
                               or min(args.steer_scales) < 0):
        raise CLIError("--steer-replies goes with --method sae and --dev-prompts, and needs --steer-scales ≥ 0")
    if args.report_limit is not None and args.report_limit < 1:
        raise CLIError("need --report-limit ≥ 1")
    if args.topic:
        try:
            Topics.of(args.topic)
        except EvalError as e:
            raise CLIError(f"--topic: {e}") from None
    t0 = time.perf_counter()
    try:
        inputs = read_inputs(args.forget, args.retain, args.dev_prompts, args.chat)
        steer = (read_files([args.steer_replies], "steer reply")[0], tuple(args.steer_scales)) \
            if args.steer_replies else None
    except UnlearnError as e:
        raise CLIError(str(e)) from None
    # deferred: the command line answers --help and bad arguments before torch and the model stack load
    from ablation.sae_io import SAELoadError, shipped_sae
    from ablation.spec import ProfileError
    from models.loading import ModelLoadError, load_model
    from models.names import chat_template
    from workshop.unlearn import final_profile, report, run, run_finetuned, summary

    with tempfile.TemporaryDirectory() as work:
        try:
            lm = load_model(args.model, device="cpu", dtype="float32")
            if args.chat and not chat_template(None, lm.tokenizer):
                raise CLIError(f"--chat: {args.model} has no chat template (its tokenizer_config.json names none); "
                               f"score its dev prompts as plain text without --chat")
            if args.method == "sae":
                result = run(lm, args.name, inputs, args.sae or shipped_sae(args.model), Path(work), args.docs,
                             args.generic_retain, scales, ks, outliers, goals, args.condition, args.generated,
                             args.markup_guard, steer)
            else:
                cfg = AdapterConfig(args.method, args.layer, args.rank, args.steps, lr=args.lr, steer=args.steer,
                                  retain_weight=args.retain_weight, beta=args.beta)
                result = run_finetuned(lm, args.name, inputs, Path(work), cfg, scales, args.docs, args.generic_retain,
                                       goals)
        except (UnlearnError, SAELoadError, ModelLoadError, ProfileError, ValueError, APIError) as e:
            raise CLIError(str(e)) from None
        print(summary(result))
        if result.chosen is None:
            raise CLIError(f"no candidate met the goals ({result.goals}; table above): give retain text closer to "
                           f"what was lost, or more specific forget text, or loosen a goal (--max-fluency-drop …)")
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"{args.name}.yaml"
        spec = final_profile(args.name, result, inputs)
        if spec.adapter:  # the chosen strength's adapter goes next to the profile, which names it relatively
            folder = args.out / f"{args.name}.adapter"
            shutil.rmtree(folder, ignore_errors=True)
            shutil.copytree(spec.adapter, folder)
            shutil.copyfile(result.trained.path / "training.json", folder / "training.json")
            spec = spec.model_copy(update={"adapter": folder.name})
        iv = spec.interventions[0] if spec.interventions else None
        if iv and iv.steer:  # the direction goes next to the profile too
            vector = args.out / f"{args.name}.steer.safetensors"
            shutil.copyfile(iv.steer.vector, vector)
            iv = iv.model_copy(update={"steer": iv.steer.model_copy(update={"vector": vector.name})})
            spec = spec.model_copy(update={"interventions": [iv, *spec.interventions[1:]]})
    path.write_text(spec.to_yaml())
    what = f"adapter {args.out / spec.adapter}" if spec.adapter else f"{len(spec.interventions[0].edits)} features"
    print(f"\nwrote {path} ({what}) in {time.perf_counter() - t0:.0f} s; "
          f"serve it with: obliviate serve --profiles {args.out}")
    if args.report:
        try:
            index = report(lm, args.name, args.out, args.topic, args.report, args.report_limit, args.chat)
        except (EvalError, APIError, ProfileError) as e:
            raise CLIError(f"{path} was written, but the reports failed: {e}") from None
        print(f"\nreports for baseline and {args.name} ({args.topic}, test split) in {args.report}:\n"
              f"{index.read_text()}\nin {time.perf_counter() - t0:.0f} s in all")
    return 0


def add_attack(sub) -> None:
    p = sub.add_parser("attack", help="search attacks offline against a profile (replayed by `obliviate eval attacks`)")
    asub = p.add_subparsers(dest="attack_command", required=True, parser_class=type(p))
    g = asub.add_parser("gcg", help="GCG: adversarial tokens before the prompt that bring the topic's answers back "
                        "under a profile (on CPU, the topic's dev prompts)")
    g.add_argument("--profile", required=True, help="a served profile's name (shipped) or a profile YAML")
    g.add_argument("--topic", required=True, help="the topic whose dev prompts are targets: hp, sw or a topic YAML")
    g.add_argument("--model", default="gemma-3-270m")
    g.add_argument("--prompts", type=int, default=6, help="dev prompts searched together (default 6)")
    g.add_argument("--tokens", type=int, default=8, help="adversarial tokens (default 8)")
    g.add_argument("--steps", type=int, default=30, help="search steps (default 30)")
    g.add_argument("--batch", type=int, default=32, help="swaps scored per step (default 32)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--out", type=Path, help="the JSON the attack report reads (default: the shipped "
                   "evals/data/attacks/gcg.json); the topic's entry is replaced")
    g.set_defaults(func=cmd_attack_gcg)


def cmd_attack_gcg(args) -> int:
    if min(args.prompts, args.tokens, args.steps, args.batch) < 1:
        raise CLIError("need --prompts, --tokens, --steps and --batch ≥ 1")
    try:
        topics = Topics.of(args.topic)
    except EvalError as e:
        raise CLIError(f"--topic: {e}") from None
    if len(topics.topics) != 1:
        raise CLIError("--topic: one topic at a time")
    topic = topics.topics[0]
    items = load_jsonl(topic.prompts, "dev", args.prompts)
    # deferred: the command line answers --help and bad arguments before torch and the model stack load
    from ablation.spec import ProfileError, default_profiles_dir, load_profile, load_profiles
    from models.loading import ModelLoadError, load_model
    from workshop.gcg import Target, search

    try:
        if args.profile.endswith((".yaml", ".yml")):
            spec = load_profile(args.profile)
        else:
            shipped = load_profiles([default_profiles_dir()], args.model)
            if args.profile not in shipped:
                raise CLIError(f"unknown profile {args.profile!r} for {args.model}: one of {', '.join(sorted(shipped))} "
                               f"or a profile YAML")
            spec = shipped[args.profile]
        lm = load_model(args.model, device="cpu", dtype="float32")
        result = search(lm, spec, [Target(it["prompt"], it["answers"][0]) for it in items], args.tokens, args.steps,
                        batch=args.batch, seed=args.seed)
    except (ProfileError, ModelLoadError, ValueError) as e:
        raise CLIError(str(e)) from None
    out = args.out or GCG_FILE
    found = json.loads(out.read_text()) if out.is_file() else {}
    found[topic.name] = {"text": result.text, "ids": result.ids, "profile": spec.name, "model": args.model,
                         "prompts": [it["id"] for it in items], "steps": args.steps, "batch": args.batch,
                         "seed": args.seed, "loss": round(result.loss, 4), "start_loss": round(result.start_loss, 4),
                         "seconds": round(result.seconds, 1)}
    out.write_text(json.dumps(found, indent=2, ensure_ascii=False) + "\n")
    print(f"{topic.name}: {result.text!r}: answer loss {result.start_loss:.2f} -> {result.loss:.2f} nats/token under "
          f"{spec.name} on {len(items)} dev prompts, {result.seconds:.0f} s; written to {out}")
    return 0
