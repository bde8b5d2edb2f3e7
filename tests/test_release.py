"""`evolm release` end to end against a stand-in Hub (tests.hubstub.py, HF_ENDPOINT): one run and a
two-node suite (pretrain -> child, 2 iterations each, a checkpoint per iteration) are exported, verified and
uploaded; the uploaded files are byte-for-byte the verified exports, the kept intermediate checkpoint is branch
step-1, a second release uploads nothing, and the cards name each model's parents. The dry run (also of the tiny
suite) lists every repo, branch and file and makes no request; bad input is one line naming the key."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO, evolm_cmd, one_line_error, run_evolm, subprocess_env, tiny
from tests.hubstub import GITATTRIBUTES, HubStub, Repo


def release(args: list[str], hub: HubStub | None, hf_home: Path, token: str | None = "hf_stub_token",
            check: bool = True):
    env = subprocess_env()
    env.pop("HF_TOKEN", None)
    env.update(HF_HUB_OFFLINE="0", HF_HOME=str(hf_home), HF_HUB_DISABLE_TELEMETRY="1",
               HF_ENDPOINT=hub.url if hub else "http://127.0.0.1:9")
    if token:
        env["HF_TOKEN"] = token
    proc = subprocess.run(evolm_cmd("release", args), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"evolm release {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-4000:]}")
    return proc


def files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
            and not p.name.startswith(".")}


@pytest.fixture(scope="module")
def suite(tmp_path_factory, data_cache):
    """A two-node suite whose runs are there: ``pre`` (pretraining) and ``ft`` (from pre), each 2 iterations with a
    checkpoint per iteration (iter_1 is kept: a step-1 revision), trained with the command lines the suite's
    launcher derives; ``eval_ft`` holds a downstream result (the eval node's schema) for the card's rows."""
    root = tmp_path_factory.mktemp("release") / "suite"
    common = ["data.synthetic_docs=400", "train.iters=2", "train.save_interval=1"]
    run_evolm("train", tiny(root / "pre", data_cache, *common))
    run_evolm("train", tiny(root / "ft", data_cache, *common, f"train.init_from={root / 'pre'}/checkpoints",
                            "train.seed=7"))
    (root / "eval_ft").mkdir()
    (root / "eval_ft" / "result.json").write_text(json.dumps({"downstream": {
        "scoring": "strict", "suites": {"gsm8k_platinum": {"pass1": 0.25, "maj16": 0.5, "pass16": 0.75}},
        "id_avg": {"pass1": 0.25, "maj16": 0.5, "pass16": 0.75}}}))
    over = [f"data.cache_dir={data_cache}", "data.synthetic_docs=400", "train.iters=2", "train.save_interval=1"]
    yaml = root.parent / "mini.yaml"
    yaml.write_text(json.dumps({
        "name": "mini", "description": "Two tiny runs for the release test.", "root": str(root),
        "train_overrides": over,
        "report": {"cpt_replay": [{"row": "ft", "eval": "eval_ft"}]},
        "nodes": {"pre": {"kind": "train", "experiment": "demo"},
                  "ft": {"kind": "train", "parent": "pre", "experiment": "demo", "overrides": ["train.seed=7"]},
                  "export_ft": {"kind": "export", "parent": "ft"},
                  "eval_ft": {"kind": "eval", "parent": "export_ft"}}}))
    return {"root": root, "yaml": yaml, "hf_home": root.parent / "hf_home"}


def test_release_one_run_uploads_the_verified_exports_once(suite, tmp_path):
    pre = suite["root"] / "pre"
    with HubStub() as hub:
        out = release([f"src={pre}", "repo=org/tiny-pre", "private=true"], hub, suite["hf_home"]).stdout
        assert "org/tiny-pre@main: 8 uploaded" in out, out
        repo = hub.repos["org/tiny-pre"]
        assert repo.private and set(repo.branches) == {"main", "step-1"}
        for branch in ("main", "step-1"):
            staged = pre / "release" / branch
            assert json.loads((staged / "evolm_export.json").read_text())["verify"]["max_diff"] <= 1e-4
            got = {p: b for p, b in repo.branches[branch].items() if p != ".gitattributes"}
            assert got == files(staged)  # byte for byte the verified export (+ its card and recipe)
        assert repo.branches["main"]["model.safetensors"] != repo.branches["step-1"]["model.safetensors"]
        card = repo.branches["main"]["README.md"].decode()
        assert "Parents: none (trained from scratch)." in card and "`step-1`" in card
        assert all(r.auth == "Bearer hf_stub_token" for r in hub.requests)

        hub.requests.clear()
        out = release([f"src={pre}", "repo=org/tiny-pre", "private=true"], hub, suite["hf_home"]).stdout
        assert hub.writes() == [], [(r.method, r.path) for r in hub.requests]
        assert "0 file(s) uploaded, 0 deleted" in out and "exported" not in out  # nor exported again

        # a file the export no longer has (a stale shard) is deleted remotely; nothing else moves
        repo.branches["main"]["model-00001-of-00002.safetensors"] = b"stale"
        hub.requests.clear()
        out = release([f"src={pre}", "repo=org/tiny-pre"], hub, suite["hf_home"]).stdout
        assert "org/tiny-pre@main: 0 uploaded, 1 deleted, 8 unchanged" in out, out
        assert "org/tiny-pre@step-1: 0 uploaded, 0 deleted" in out
        assert "model-00001-of-00002.safetensors" not in repo.branches["main"]


def test_a_staged_export_is_reused_only_whole_and_with_the_same_settings(suite, tmp_path):
    """The staged export of a revision is uploaded again only as it was exported: a deleted weights file (a disk
    clean-up) or another dtype makes a new verified export -- the Hub never loses the weights nor gets the old
    dtype; an intact one is reused without exporting."""
    pre = tmp_path / "pre"
    shutil.copytree(suite["root"] / "pre", pre)
    shutil.rmtree(pre / "release", ignore_errors=True)
    with HubStub() as hub:
        release([f"src={pre}", "repo=org/reuse", "revisions=false"], hub, suite["hf_home"])
        staged = pre / "release" / "main"
        weights = staged / "model.safetensors"
        want = weights.read_bytes()
        weights.unlink()
        out = release([f"src={pre}", "repo=org/reuse", "revisions=false"], hub, suite["hf_home"]).stdout
        repo = hub.repos["org/reuse"]
        assert weights.read_bytes() == want and repo.branches["main"]["model.safetensors"] == want, out
        out = release([f"src={pre}", "repo=org/reuse", "revisions=false", "dtype=bf16"], hub, suite["hf_home"]).stdout
        assert json.loads((staged / "evolm_export.json").read_text())["dtype"] == "bf16"
        assert repo.branches["main"]["model.safetensors"] == weights.read_bytes() != want
        record = json.loads((staged / "evolm_export.json").read_text())
        assert record["run_id"] and "model.safetensors" in record["files"] and "README.md" not in record["files"]
        hub.requests.clear()
        out = release([f"src={pre}", "repo=org/reuse", "revisions=false", "dtype=bf16"], hub, suite["hf_home"]).stdout
        assert hub.writes() == [] and "0 file(s) uploaded, 0 deleted" in out, out


def test_release_suite_cards_name_parents_and_index(suite):
    root = suite["root"]
    with HubStub() as hub:
        out = release([f"suite={suite['yaml']}", "org=org"], hub, suite["hf_home"]).stdout
        pre_repo, ft_repo = "org/evolm-158k-pre", "org/evolm-158k-ft"
        assert set(hub.repos) == {pre_repo, ft_repo, "org/evolm-mini"}, out
        for node, repo in (("pre", pre_repo), ("ft", ft_repo)):
            assert set(hub.repos[repo].branches) == {"main", "step-1"}
            for branch in ("main", "step-1"):
                got = {p: b for p, b in hub.repos[repo].branches[branch].items() if p != ".gitattributes"}
                assert got == files(root / node / "release" / branch)
        card = hub.repos[ft_repo].branches["main"]["README.md"].decode()
        assert f"base_model: {pre_repo}" in card
        assert f"Parents: [{pre_repo}](https://huggingface.co/{pre_repo}) (pretrain, iteration 2)." in card
        assert "| eval_ft | downstream | gsm8k_platinum | 0.25 | 0.5 | 0.75 |" in card
        assert "evolm train experiment=demo" in card and "train.seed=7" in card
        step_card = hub.repos[ft_repo].branches["step-1"]["README.md"].decode()
        assert "revision `step-1` = iteration 1" in step_card and f"base_model: {pre_repo}" in step_card
        index = hub.repos["org/evolm-mini"].branches["main"]
        text = index["README.md"].decode()
        assert f"| ft | [{ft_repo}](https://huggingface.co/{ft_repo}) | pretrain | [{pre_repo}]" in text
        assert "| ft | 25.00 | - |" in text  # the suite report's table (CPT replay row)
        assert index["suite.yaml"] == suite["yaml"].read_bytes()
        assert json.loads(index["models.json"])["models"][1]["parent"] == pre_repo

        hub.requests.clear()
        release([f"suite={suite['yaml']}", "org=org"], hub, suite["hf_home"])
        assert hub.writes() == [], [(r.method, r.path) for r in hub.requests]

    with HubStub() as hub:  # only=: that node (its parent still named) and the whole index table
        release([f"suite={suite['yaml']}", "org=org", "only=[ft]"], hub, suite["hf_home"])
        assert set(hub.repos) == {ft_repo, "org/evolm-mini"}
        assert f"base_model: {pre_repo}" in hub.repos[ft_repo].branches["main"]["README.md"].decode()
        assert f"| pre | [{pre_repo}]" in hub.repos["org/evolm-mini"].branches["main"]["README.md"].decode()


def test_a_repo_holding_another_runs_release_is_refused_before_any_export(suite, tmp_path):
    """A second run released to a repo that holds the first run's release (two runs, one repo pattern) is refused in
    one line naming ``repo`` before anything is exported or pushed, as is a repo holding files no release made and
    a suite's index repo holding another launch's index; a copy of the same run (same run id) is the same release,
    and ``overwrite=true`` replaces the other run's files."""
    pre, ft, home = suite["root"] / "pre", suite["root"] / "ft", suite["hf_home"]
    with HubStub() as hub:
        release([f"src={pre}", "repo=org/shared", "revisions=false", f"out={tmp_path / 'pre'}"], hub, home)
        first = dict(hub.repos["org/shared"].branches["main"])
        hub.requests.clear()
        proc = release([f"src={ft}", "repo=org/shared", f"out={tmp_path / 'ft'}"], hub, home, check=False)
        pre_id = json.loads(first["evolm_export.json"])["run_id"]
        ft_id = json.loads(next((ft / "checkpoints").glob("iter_*/evolm.json")).read_text())["run_id"]
        assert f"org/shared@main holds the release of another run (run {pre_id}" in one_line_error(proc, "repo")
        assert f"this is run {ft_id})" in proc.stderr and "overwrite=true" in proc.stderr
        assert hub.writes() == [] and hub.repos["org/shared"].branches["main"] == first
        assert not (tmp_path / "ft").exists()  # refused before the export

        copy = tmp_path / "pre_copy"  # the same run elsewhere (a moved run dir): its own release, same weights
        shutil.copytree(pre, copy, ignore=shutil.ignore_patterns("release"))
        out = release([f"src={copy}", "repo=org/shared", "revisions=false"], hub, home).stdout
        assert "org/shared@main: 1 uploaded, 0 deleted, 7 unchanged" in out, out  # the record names the new path
        assert hub.repos["org/shared"].branches["main"]["model.safetensors"] == first["model.safetensors"]

        hub.repos["org/theirs"] = Repo(private=False, branches={"main": {".gitattributes": GITATTRIBUTES,
                                                                         "weights.bin": b"not ours"}},
                                       heads={"main": "0" * 40})
        proc = release([f"src={pre}", "repo=org/theirs", "revisions=false"], hub, home, check=False)
        assert "org/theirs@main holds files no evolm release put there (weights.bin)" in one_line_error(proc, "repo")

        out = release([f"src={ft}", "repo=org/shared", "revisions=false", "overwrite=true",
                       f"out={tmp_path / 'ft'}"], hub, home).stdout
        main = hub.repos["org/shared"].branches["main"]
        assert json.loads(main["evolm_export.json"])["run_id"] == ft_id, out

        index = {"suite": "mini", "models": [{"node": "pre", "repo": "org/a", "run_id": "another-launch"}]}
        hub.repos["org/evolm-mini"] = Repo(private=False, branches={"main": {
            ".gitattributes": GITATTRIBUTES, "models.json": json.dumps(index).encode()}}, heads={"main": "0" * 40})
        hub.requests.clear()
        proc = release([f"suite={suite['yaml']}", "org=org", f"out={tmp_path / 'suite'}"], hub, home, check=False)
        err = one_line_error(proc, "index_repo")
        assert f"another launch of suite 'mini' (its node pre is run another-launch, this one's is run {pre_id})" \
            in err, err
        assert hub.writes() == [] and not (tmp_path / "suite").exists()


def test_a_parent_named_relatively_at_training_is_found_from_anywhere(suite, tmp_path, data_cache):
    """A child trained from `train.init_from=runs/pre/checkpoints` (relative to where it ran): its lineage records
    the parent's absolute path, so a release from another directory names the parent (its card's base model), not a
    missing one under the current directory."""
    proj = tmp_path / "proj"
    shutil.copytree(suite["root"] / "pre", proj / "runs" / "pre")
    shutil.rmtree(proj / "runs" / "pre" / "release", ignore_errors=True)  # never released: named by its run dir
    proc = subprocess.run(evolm_cmd("train", tiny("runs/child", data_cache, "data.synthetic_docs=400",
                                                  "train.iters=1", "train.init_from=runs/pre/checkpoints")),
                          cwd=proj, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads(next((proj / "runs" / "child" / "checkpoints").glob("iter_*/evolm.json")).read_text())
    assert meta["lineage"]["parent"] == str(proj / "runs" / "pre" / "checkpoints")
    out = release([f"src={proj / 'runs' / 'child'}", "repo=org/child", "dry_run=true"], None, suite["hf_home"],
                  token=None).stdout
    assert f"parent {proj / 'runs' / 'pre'})" in out, out


def test_release_dry_run_lists_everything_without_network(suite, tmp_path):
    with HubStub() as hub:
        out = release([f"suite={suite['yaml']}", "org=org", "dry_run=true", f"out={tmp_path / 'stage'}"], hub,
                      suite["hf_home"], token=None).stdout
        assert hub.requests == []
    assert not (tmp_path / "stage").exists()  # nothing written either
    for repo in ("org/evolm-158k-pre", "org/evolm-158k-ft", "org/evolm-mini"):
        assert f"repo {repo} (public;" in out, out
    assert out.count("  branch step-1 <- ") == 2 and out.count("  branch main <- ") == 3
    for name in ("model.safetensors", "config.json", "README.md", "tokenizer.json", "recipe.yaml"):
        assert f"    {name}  (to export)" in out
    assert "dry run: 2 model repo(s), 4 revision(s), 1 index repo; nothing pushed" in out

    # the tiny suite with nothing trained yet: every train node listed as not finished
    with HubStub() as hub:
        out = release(["suite=tiny", "org=org", "dry_run=true", f"root={tmp_path / 'tiny'}"], hub, suite["hf_home"],
                      token=None).stdout
        assert hub.requests == []
    for node in ("pretrain_40it", "pretrain_80it", "cpt_80it_fw8_fm42", "cpt_80it_fw1_fm49", "sft_ep1", "sft_ep2",
                 "ppo_sft_ep2"):
        assert f"skip {node}: no committed checkpoint" in out, out
    assert "6 node(s) not finished" not in out and "7 node(s) not finished" in out


@pytest.mark.parametrize("damage, message", [('{"downstream": ', "not valid JSON"),
                                             ('{"upstream": 5}', "field 'upstream' must be an object or null")])
def test_a_damaged_eval_result_is_one_line_before_any_export(suite, tmp_path, damage, message):
    """The model card's evaluation rows come from the suite's eval nodes' result.json: one that was not JSON was left
    out of the card without a word, one with a field of another type was an AttributeError while the card was
    written (after the exports). Now the plan (the dry run too) names the file."""
    root = tmp_path / "suite"
    root.mkdir()
    for node in ("pre", "ft"):  # the module's runs, read only: the release stages nothing in a dry run
        (root / node).symlink_to(suite["root"] / node)
    (root / "eval_ft").mkdir()
    (root / "eval_ft" / "result.json").write_text(damage)
    yaml = tmp_path / "mini.yaml"
    yaml.write_text(suite["yaml"].read_text().replace(json.dumps(str(suite["root"])), json.dumps(str(root))))
    proc = release([f"suite={yaml}", "org=org", "dry_run=true"], None, suite["hf_home"], token=None, check=False)
    assert message in one_line_error(proc, str(root / "eval_ft" / "result.json"))


def test_release_bad_input_is_one_line(suite, tmp_path):
    home = suite["hf_home"]
    proc = release([f"src={tmp_path / 'nope'}", "repo=org/x"], None, home, check=False)
    assert "no such run directory" in one_line_error(proc, "src")
    unfinished = tmp_path / "unfinished"
    shutil.copytree(suite["root"] / "pre", unfinished, ignore=shutil.ignore_patterns("release"))
    shutil.rmtree(unfinished / "checkpoints" / "iter_0000002")
    proc = release([f"src={unfinished}", "repo=org/x"], None, home, check=False)
    assert "not finished (iter_0000001 of 2 iterations)" in one_line_error(proc, "src")
    proc = release([f"src={unfinished}"], None, home, check=False)
    one_line_error(proc, "src")
    # its one checkpoint cut short: not "no committed checkpoint ... evolm train resumes it" (a resume refuses)
    shard = sorted((unfinished / "checkpoints" / "iter_0000001").glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:10])
    line = one_line_error(release([f"src={unfinished}", "repo=org/x"], None, home, check=False), "src")
    assert f"its committed ones are damaged (iter_0000001: {shard.name}" in line and "train.overwrite=true" in line \
        and "resumes it" not in line, line
    pre = suite["root"] / "pre"
    proc = release([f"src={pre}"], None, home, check=False)
    assert "must be set" in one_line_error(proc, "repo")
    proc = release([f"src={pre}", "repo={org}/x-{bogus}", "org=me"], None, home, check=False)
    assert "unknown placeholder {bogus}" in one_line_error(proc, "repo")
    proc = release([f"src={pre}", "repo=org/bad--name"], None, home, check=False)
    assert "not a valid Hub repo id" in one_line_error(proc, "repo")
    proc = release([f"src={pre}", "repo=org/x", "verify_tol=nan"], None, home, check=False)
    assert "finite number > 0" in one_line_error(proc, "verify_tol")  # NaN would pass any export's verification
    afile = tmp_path / "afile"
    afile.write_text("x")
    proc = release([f"src={pre}", "repo=org/x", f"out={afile}"], None, home, check=False)
    assert "is a file" in one_line_error(proc, "out")
    proc = release([f"suite={suite['yaml']}"], None, home, check=False)
    assert "{org}" in one_line_error(proc, "org")
    proc = release([f"suite={suite['yaml']}", "org=org", "repo=org/same"], None, home, check=False)
    assert "for both pre and ft" in one_line_error(proc, "repo")
    empty = tmp_path / "home"
    empty.mkdir()
    proc = release([f"src={pre}", "repo=org/x"], None, empty, token=None, check=False)
    assert "set HF_TOKEN" in one_line_error(proc, "HF_TOKEN")
    proc = release([f"src={pre}", "repo=org/x"], None, home, check=False)  # nothing listens on the endpoint
    assert "cannot reach" in one_line_error(proc, "HF_ENDPOINT")
    assert os.path.isdir(pre / "checkpoints" / "iter_0000002")
