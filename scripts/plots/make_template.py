"""Write the page template that .dvc/config names for `dvc plots show` and `dvc plots diff`.

DVC's own page loads vega, vega-lite and vega-embed from a CDN and is blank offline. This one
inlines the same versions, installed by `npm ci` from package-lock.json next to this file, so a
rendered dvc_plots/index.html draws with no network wherever it is moved. `--cdn` writes DVC's
CDN tags instead, for a machine without npm. scripts/install.sh runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SKELETON = HERE / "template.html"
OUTPUT = HERE / "offline.html"  # git-ignored; .dvc/config: html_template = ../scripts/plots/...
NODE_MODULES = HERE / "node_modules"
LIBRARIES = ("vega", "vega-lite", "vega-embed")  # load order: vega-embed needs the other two
MARKER = "<!-- vega libraries -->"
# dvc_render fills these by str.replace over the whole page, inlined code included.
DVC_PLACEHOLDERS = ("{plot_divs}", "{scripts}", "{refresh_tag}")


class TemplateError(Exception):
    """An expected failure: missing or unexpected node_modules."""


def pinned_versions() -> dict[str, str]:
    return json.loads((HERE / "package.json").read_text(encoding="utf-8"))["dependencies"]


def library_script(name: str, version: str, node_modules: Path = NODE_MODULES) -> str:
    """One <script> element holding the package's browser build (the file jsDelivr serves)."""
    package_dir = node_modules / name
    try:
        package = json.loads((package_dir / "package.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TemplateError(f"{package_dir} missing: run `npm ci` in {HERE}") from None
    if package["version"] != version:
        raise TemplateError(f"{package_dir} is {package['version']}, package.json pins "
                            f"{version}: run `npm ci` in {HERE}")
    build = package_dir / package["jsdelivr"]
    lines = build.read_text(encoding="utf-8").splitlines()
    code = "\n".join(line for line in lines if not line.startswith("//# sourceMappingURL="))
    for text in ("</script", "<!--", *DVC_PLACEHOLDERS):
        if text in code:
            raise TemplateError(f"{build} contains {text!r}: it cannot be inlined as is")
    return f"<script>/* {name}@{version}, {build.relative_to(node_modules)} */\n{code}\n</script>"


def page_template(cdn: bool = False) -> str:
    if cdn:
        libraries = "{scripts}"  # dvc_render puts its CDN <script> tags here
    else:
        libraries = "\n".join(library_script(n, pinned_versions()[n]) for n in LIBRARIES)
    return SKELETON.read_text(encoding="utf-8").replace(MARKER, libraries)


def write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cdn", action="store_true",
                        help="load the libraries from DVC's CDN (pages are blank offline)")
    parser.add_argument("--output", type=Path, default=OUTPUT, help=f"default: {OUTPUT}")
    args = parser.parse_args(argv)
    try:
        write_atomically(args.output, page_template(cdn=args.cdn))
    except TemplateError as e:
        print(f"make_template: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
