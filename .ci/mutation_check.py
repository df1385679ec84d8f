"""Plant each known class of method bug and check that a fast test fails (issue 13).

    python .ci/mutation_check.py [NAME ...]      # all mutants by default; restores the sources

Each mutant is one textual edit of the engine. A mutant that survives (every test passes) is a
hole in the tests; the script exits 1 and names it.
"""
import pathlib
import signal
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
TESTS = ["tests/test_solvers.py", "tests/test_method_oracles.py", "tests/test_allocation.py",
         "tests/test_output_weighting.py", "tests/test_pipeline.py", "tests/test_tune.py", "tests/test_io.py",
         "tests/test_resume.py", "tests/test_distributed.py", "tests/test_cli.py"]  # quick files first: a mutant stops at its first failing test

# name -> (file, original text, mutated text)
MUTANTS = {
    "delta sign flipped": (
        "svdkern/solvers/factorize.py", "G = G + beta * wh.right_inv_t(", "G = G - beta * wh.right_inv_t("),
    "delta transposed": (
        "svdkern/solvers/factorize.py", "W @ delta.to(torch.float64)", "W @ delta.to(torch.float64).T"),
    "aces beta fixed at an interval end": (
        "svdkern/pipeline.py", "beta = aces_beta(coef, cfg.aces_range)", "beta = cfg.aces_range[0]"),
    "svd-llm propagates the compressed layer": (
        "svdkern/pipeline.py",
        "                    distributed.share_solves(layer, prefix, solved_elsewhere, report)\n",
        "                    distributed.share_solves(layer, prefix, solved_elsewhere, report)\n"
        "                streams[\"fp\"] = propagate(layer, fp_in, kwargs, device, offload)\n"),
    "rec stage 2 in the whitened metric": (
        "svdkern/solvers/factorize.py", "R = W.to(torch.float64) - U1 @ V1",
        "R = (W.to(torch.float64) - U1 @ V1) @ (wh.P if wh is not None else 1)"),
    "plc searches at ratio R instead of N*R/k": (
        "svdkern/policy.py", "_plc_trial_layer(layer, arch, solved, plc_layer_ratio(N, cfg.ratio, k), cfg, i)",
        "_plc_trial_layer(layer, arch, solved, cfg.ratio, cfg, i)"),
    "sc computes all group inputs before replacing any group (staged executor)": (
        "svdkern/pipeline.py", 'stages = (LlamaStages(layer, streams["compressed"]',
        'stages = (LlamaStages(copy.deepcopy(layer), streams["compressed"]'),
    "sc computes all group Grams before replacing any group (generic driver)": (
        "svdkern/pipeline.py", "                            layer, lead, streams[\"compressed\"][b].to(device), kwargs[b])",
        "                            layer_before, lead, streams[\"compressed\"][b].to(device), kwargs[b])"),
    # resume: the checkpoint must name everything that shapes the factors, and keep the report
    "resume ignores the batch size": (
        "svdkern/checkpoint.py", '"batch_size": batch_size,', '"batch_size": None,'),
    "resume forgets the report entries": (
        "svdkern/checkpoint.py", 'getattr(report, key).update(progress["report"].get(key, {}))', "pass"),
    "resume reads the newest stream file, not the one progress names": (
        "svdkern/checkpoint.py", 'os.path.join(self.dir, _stream_file(progress["next_layer"] - 1))',
        'os.path.join(self.dir, sorted(f for f in os.listdir(self.dir) if f.startswith("streams_") '
        'and f.endswith(".pt"))[-1])'),
    # end-to-end tuning (tune.py, head.py)
    "tuning keeps its last epoch, not the best held-out one": (
        "svdkern/tune.py", '    copy_to_model(state["best_params"])', "    pass"),
    "tuning resume forgets the optimizer state": (
        "svdkern/tune.py", '                opt.load_state_dict(state.pop("optimizer"))', '                state.pop("optimizer")'),
    "tuning trains the norms without being asked": (
        "svdkern/tune.py", '        elif norms and "norm" in type(module).__name__.lower():',
        '        elif "norm" in type(module).__name__.lower():'),
    "tuning's KL drops the top-k term": (
        "svdkern/tune.py", "kl = (logp.exp() * (logp - q_top)).sum(-1)", "kl = (logp.exp() * (logp - q_top)).sum(-1) * 0"),
    "the chunked head forgets Gemma's logit soft-capping": (
        "svdkern/head.py", "    if cap:", "    if False:"),
    # rank alignment gives back what rounding frees, within the budget (allocation.py)
    "alignment gives nothing back": (
        "svdkern/allocation.py", "    candidates = [n for n, a in steps.items() if a > 1]", "    candidates = []"),
    "alignment overshoots the budget": (
        "svdkern/allocation.py", "if spent + steps[n] * (by_name[n].m + by_name[n].n) <= budget",
        "if spent + steps[n] * (by_name[n].m + by_name[n].n) <= budget * 1.01"),
    "alignment ignores the importances": (
        "svdkern/allocation.py", "        if importance is not None:", "        if False:"),
    # AA-SVD (presets.py, refine.py, pipeline.py)
    "aa-svd whitens with the compressed stream": (
        "svdkern/pipeline.py", '                    if cfg.gram_stream == "fp":', "                    if False:"),
    "aa-svd's schedule decays to 0, not 0.1": (
        "svdkern/refine.py", "    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))",
        "    return 0.5 * (1 + math.cos(math.pi * progress))"),
    "aa-svd refines only the factors": (
        "svdkern/refine.py", '"aa-svd": Recipe(train_all=True,', '"aa-svd": Recipe(train_all=False,'),
    "aa-svd steps once per micro-batch, not per 32 windows": (
        "svdkern/refine.py", "                            step_windows=32)}", "                            step_windows=None)}"),
    "aa-svd keeps its best state": (
        "svdkern/refine.py", "                if now < best or not recipe.keep_best:", "                if now < best:"),
    # allocation oracles (allocation.py, sensitivity.py, policy.py)
    "going dense gains one component, not the spectrum's tail": (
        "svdkern/allocation.py", "        gain = float(imp[rank:].sum())", "        gain = float(imp[rank])"),
    "importance weighs σ, not σ²": (
        "svdkern/sensitivity.py", "weighted = sigma2 * (svd.U ** 2 * f[:, None]).sum(0)",
        "weighted = svd.S * (svd.U ** 2 * f[:, None]).sum(0)"),
    "the rank floor is half the one asked for": (
        "svdkern/policy.py", "floor = {s.name: max(1, math.floor(cfg.min_rank_fraction",
        "floor = {s.name: max(1, math.floor(0.5 * cfg.min_rank_fraction"),
    # output-aware whitening (factorize.py, sensitivity.py, pipeline.py)
    "output weighting leaves S in U": (
        "svdkern/solvers/factorize.py", "        U1 = U1 / out_scale.to(U1)[:, None]", "        pass"),
    "output weighting reads the group lead's Fisher": (
        "svdkern/pipeline.py", "output_weights(fisher[prefix + name]", "output_weights(fisher[prefix + names[0]]"),
    "a resumed run measures the Fisher again": (
        "svdkern/pipeline.py", "fisher = ckpt.load_fisher() if ckpt is not None else None", "fisher = None"),
    # EP's Δ filtered by the Gram (issue 22 part 2)
    "two streams use the raw Δ": (
        "svdkern/pipeline.py", "return visible_delta(delta, H, delta_damp_rel) if delta_damp_rel else delta",
        "return delta"),
    # issue 22 part 1, second round: V2's loss, tokens under two processes, eigh damping, refinement
    "v2's loss skips the first truncated component": (
        "svdkern/policy.py", "sigma2[uniform[s.name]:]", "sigma2[uniform[s.name] + 1:]"),
    "v2's loss counts one rank's tokens": (
        "svdkern/sensitivity.py", "tokens = distributed.summed_count(st.count, device)", "tokens = st.count"),
    "eigh's floor is absolute, not relative to the Gram": (
        "svdkern/solvers/whiten.py", "floor = damp_rel * evals.clamp_min(0).mean()", "floor = damp_rel"),
    "eigh adds the floor instead of flooring": (
        "svdkern/solvers/whiten.py", "evals.clamp_min(floor).sqrt()", "(evals.clamp_min(0) + floor).sqrt()"),
    "refinement's target is the compressed stream": (
        "svdkern/pipeline.py", '_refine(layer, streams["compressed"], streams["fp"], kwargs',
        '_refine(layer, streams["compressed"], streams["compressed"], kwargs'),
    "svdkern's refinement trains the whole block": (
        "svdkern/refine.py", 'RECIPES = {"svdkern": Recipe(),', 'RECIPES = {"svdkern": Recipe(train_all=True),'),
    "the spectra pass resumes on the stream it started with": (
        "svdkern/sensitivity.py", "        start, hidden, kept = saved", "        start, _, kept = saved"),
    # biases and what is saved (nn.py, hf_quantizer.py)
    "the autograd path drops the bias": (
        "svdkern/nn.py", "            return F.linear(F.linear(x, self.V), self.U, self.bias)\n        if torch.compiler",
        "            return F.linear(F.linear(x, self.V), self.U)\n        if torch.compiler"),
    "rank padding drops the bias": (
        "svdkern/nn.py", "from_factors(U, V, None if self.bias is None else self.bias.detach())",
        "from_factors(U, V, None)"),
    "saving ignores the dtype asked for": (
        "svdkern/hf_quantizer.py",
        "cast[ident] = value.to(dtype) if dtype is not None and value.is_floating_point() else value",
        "cast[ident] = value"),
    "the staged executor propagates results from before refinement": (
        "svdkern/pipeline.py", "if staging and not cfg.refine_epochs else None)", "if staging else None)"),
    # issue 21: the default tunes end to end, so its cost is checked before the run
    "too few windows for tuning found only after the layer-wise solve": (
        "svdkern/pipeline.py", "split_windows(len(windows), cfg.tune_holdout)  # too few",
        "(len(windows), cfg.tune_holdout)  # too few"),
    "the memory estimate undercounts tuning's AdamW state": (
        "svdkern/preflight.py", "per_param = 12 if itemsize == 4 else", "per_param = 8 if itemsize == 4 else"),
    "the command line leaves tuning out of its memory check": (
        "svdkern/cli.py", "else None, eval_batch, cfg)", "else None, eval_batch)"),
}
# the generic "all Grams first" mutant needs the untouched layer at hand
SETUP = {"sc computes all group Grams before replacing any group (generic driver)": (
    "svdkern/pipeline.py", "                for g, group in enumerate(arch.groups):\n"
    "                    if all(ranks[prefix + n] is None for n in group):",
    "                layer_before = copy.deepcopy(layer)\n"
    "                for g, group in enumerate(arch.groups):\n"
    "                    if all(ranks[prefix + n] is None for n in group):")}


def edit(path, old, new):
    file = ROOT / path
    text = file.read_text()
    if text.count(old) != 1:
        raise SystemExit(f"mutant anchor not found exactly once in {path}: {old!r}")
    file.write_text(text.replace(old, new))


def main(names):
    survivors = []
    for name in names or MUTANTS:
        touched = {MUTANTS[name][0]} | ({SETUP[name][0]} if name in SETUP else set())
        saved = {p: (ROOT / p).read_text() for p in touched}
        try:
            if name in SETUP:
                edit(*SETUP[name])
            edit(*MUTANTS[name])
            run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-m", "not slow",
                                  "-p", "no:cacheprovider", *TESTS], cwd=ROOT, capture_output=True, text=True)
        finally:
            for p, text in saved.items():
                (ROOT / p).write_text(text)
        failed = [line for line in run.stdout.splitlines() if line.startswith("FAILED")]
        print(f"{'caught' if run.returncode else 'SURVIVED'}: {name}" + (f"  <- {failed[0]}" if failed else ""),
              flush=True)
        if run.returncode == 0:
            survivors.append(name)
    return 1 if survivors else 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("terminated: the sources are restored"))  # runs the finally
    sys.exit(main(sys.argv[1:]))
