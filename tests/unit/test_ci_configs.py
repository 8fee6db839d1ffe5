"""The CI configurations in the repository are valid for their engines, offline: the
GitHub Actions workflow and the GitLab CI file against check-jsonschema's vendored schemas,
the Kubernetes manifest against the Kubernetes API's JSON schemas that kubernetes-validate
ships. Each check is also shown to reject a broken copy, and the shard wiring is checked:
the shard list is 1..N, GitLab uses ``parallel:``, the Indexed Job's total matches."""

from __future__ import annotations

import copy
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

REPO = Path(__file__).resolve().parents[2]
GITHUB = REPO / ".github" / "workflows" / "matrix.yml"
GITLAB = REPO / ".gitlab-ci.yml"
KUBE = REPO / "ci" / "kubernetes" / "matrix-job.yaml"
KUBE_VERSION = "1.37.0"


def check_jsonschema(schema: str, path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema",
                           schema, str(path)], capture_output=True, text=True, timeout=120,
                          check=False)


def kube_errors(doc: dict[str, Any]) -> str | None:
    try:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return str(exc)
    return None


class CIConfigTest(unittest.TestCase):
    def broken(self, path: Path, data: Any, schema: str) -> str:
        with tempfile.NamedTemporaryFile("w", suffix=path.suffix) as f:
            yaml.safe_dump(data, f)
            f.flush()
            res = check_jsonschema(schema, Path(f.name))
        self.assertNotEqual(res.returncode, 0, "a broken copy passed the schema")
        return res.stdout + res.stderr

    def test_github_workflow(self) -> None:
        res = check_jsonschema("vendor.github-workflows", GITHUB)
        self.assertEqual(res.returncode, 0, res.stdout + res.stderr)
        wf = yaml.safe_load(GITHUB.read_text())
        shards = wf["jobs"]["shard"]["strategy"]["matrix"]["shard"]
        self.assertEqual(shards, list(range(1, len(shards) + 1)))
        run = "\n".join(s.get("run", "") for s in wf["jobs"]["shard"]["steps"])
        self.assertIn('--shard "${{ matrix.shard }}/${{ strategy.job-total }}"', run)
        self.assertIn("pinlab merge", "\n".join(s.get("run", "").replace("pinlab.sh", "pinlab")
                                                for s in wf["jobs"]["merge"]["steps"]))
        self.assertEqual(wf["jobs"]["merge"]["needs"], "shard")
        uses = [s.get("uses", "") for s in wf["jobs"]["shard"]["steps"]]
        self.assertTrue(any(u.startswith("actions/cache@") for u in uses))
        self.assertTrue(any(u.startswith("actions/upload-artifact@") for u in uses))
        bad = copy.deepcopy(wf)
        del bad["jobs"]["shard"]["runs-on"]
        self.broken(GITHUB, bad, "vendor.github-workflows")

    def test_gitlab_ci(self) -> None:
        res = check_jsonschema("vendor.gitlab-ci", GITLAB)
        self.assertEqual(res.returncode, 0, res.stdout + res.stderr)
        ci = yaml.safe_load(GITLAB.read_text())
        self.assertIsInstance(ci["matrix"]["parallel"], int)
        self.assertIn("pinlab.sh matrix", "\n".join(ci["matrix"]["script"]))
        self.assertIn("pinlab.sh merge", "\n".join(ci["merge"]["script"]))
        self.assertEqual(ci["merge"]["needs"][0]["job"], "matrix")
        bad = copy.deepcopy(ci)
        bad["matrix"]["parallel"] = "three"
        self.broken(GITLAB, bad, "vendor.gitlab-ci")

    def test_kubernetes_manifest(self) -> None:
        docs = [d for d in yaml.safe_load_all(KUBE.read_text()) if d]
        for d in docs:
            self.assertIsNone(kube_errors(d), f"{d['kind']}/{d['metadata']['name']}")
        jobs = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Job"}
        matrix = jobs["pinlab-matrix"]["spec"]
        self.assertEqual(matrix["completionMode"], "Indexed")
        for name in ("pinlab-matrix", "pinlab-merge"):
            env = {e["name"]: e["value"] for e in
                   jobs[name]["spec"]["template"]["spec"]["containers"][0]["env"]}
            self.assertEqual(int(env["PINLAB_SHARD_TOTAL"]), matrix["completions"], name)
        self.assertIn("pinlab.sh merge", jobs["pinlab-merge"]["spec"]["template"]["spec"]
                      ["containers"][0]["args"][0])
        bad = copy.deepcopy(jobs["pinlab-matrix"])
        bad["spec"]["completionMode"] = 3
        self.assertIsNotNone(kube_errors(bad))
        bad = copy.deepcopy(jobs["pinlab-matrix"])
        bad["spec"]["template"]["spec"]["containers"][0]["commandd"] = ["true"]
        self.assertIsNotNone(kube_errors(bad))   # strict: unknown fields are errors


if __name__ == "__main__":
    unittest.main()
