"""Copy the generated CRDs (crds/*.yaml, the one source) into the chart as templates.

Helm never upgrades files in a chart's crds/ directory, so the chart ships each CRD as a template:
`helm upgrade` then upgrades it like any other object. The template is guarded by
`.Values.crds.install` and annotated `helm.sh/resource-policy: keep` (while `.Values.crds.keep`), so
`helm uninstall` never deletes the CRD and with it every LingDeployment in the cluster.

    python charts/ling-operator/hack/sync_crds.py           # write the chart's copies
    python charts/ling-operator/hack/sync_crds.py --check   # exit 1 when a copy is stale
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[3]
SOURCE_DIR = REPO / "crds"
CHART_CRD_DIR = REPO / "charts" / "ling-operator" / "templates" / "crds"
KEEP_MARK = "__LING_KEEP_POLICY__"
LABELS_MARK = "__LING_CHART_LABELS__"
# The keys that the chart's "ling-operator.labels" helper writes.
CHART_LABEL_KEYS = (
    "helm.sh/chart",
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/part-of",
)


def _escape_helm(text: str) -> str:
    # A CRD description could contain "{{"; Helm must print it, not evaluate it.
    return text.replace("{{", '{{ "{{" }}')


def render_template(source: Path) -> str:
    """The chart template for one generated CRD file (pure: text in, text out)."""
    docs = [d for d in yaml.safe_load_all(source.read_text()) if d]
    if not docs:
        raise ValueError(f"{source}: no YAML document; expected a CustomResourceDefinition")
    parts = []
    for doc in docs:
        if doc.get("kind") != "CustomResourceDefinition":
            raise ValueError(
                f"{source}: kind is {doc.get('kind')!r}; only CustomResourceDefinition is accepted"
            )
        metadata = doc.setdefault("metadata", {})
        metadata.setdefault("annotations", {})[KEEP_MARK] = "x"
        labels = metadata.setdefault("labels", {})
        for key in CHART_LABEL_KEYS:  # the chart's labels replace these (a duplicate key is invalid YAML)
            labels.pop(key, None)
        labels[LABELS_MARK] = "x"
        text = _escape_helm(yaml.safe_dump(doc, sort_keys=False, width=120))
        text = text.replace(
            f"    {KEEP_MARK}: x\n",
            "    {{- if $.Values.crds.keep }}\n    helm.sh/resource-policy: keep\n    {{- end }}\n",
        )
        text = text.replace(
            f"    {LABELS_MARK}: x\n", '    {{- include "ling-operator.labels" $ | nindent 4 }}\n'
        )
        parts.append(text)
    header = (
        f"{{{{- /* GENERATED from crds/{source.name} by charts/ling-operator/hack/sync_crds.py: do not edit. */}}}}\n"
        "{{- if .Values.crds.install }}\n"
    )
    return header + "---\n".join(parts) + "{{- end }}\n"


def desired_files(source_dir: Path = SOURCE_DIR) -> dict[str, str]:
    """File name -> template text for every generated CRD (examples/ and other dirs are not CRDs)."""
    return {src.name: render_template(src) for src in sorted(source_dir.glob("*.yaml"))}


def stale_files(source_dir: Path = SOURCE_DIR, chart_dir: Path = CHART_CRD_DIR) -> list[str]:
    """Names of chart copies that are missing, differ from their source, or have no source."""
    want = desired_files(source_dir)
    have = {p.name: p.read_text() for p in chart_dir.glob("*.yaml")} if chart_dir.is_dir() else {}
    return sorted(name for name in want.keys() | have.keys() if want.get(name) != have.get(name))


def sync(source_dir: Path = SOURCE_DIR, chart_dir: Path = CHART_CRD_DIR) -> list[str]:
    want = desired_files(source_dir)
    chart_dir.mkdir(parents=True, exist_ok=True)
    for old in chart_dir.glob("*.yaml"):
        if old.name not in want:
            old.unlink()
    for name, text in want.items():
        (chart_dir / name).write_text(text)
    return sorted(want)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale copies (exit 1 if any)")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        if stale:
            print(f"stale chart CRDs: {', '.join(stale)}; run python {Path(__file__).relative_to(REPO)}")
            return 1
        return 0
    for name in sync():
        print(f"wrote {CHART_CRD_DIR.relative_to(REPO)}/{name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
