"""Regenerate p402core/data/default_catalog.json from LiteLLM's public price map.

Prices are facts, not opinions: every number in the default catalog is taken
from LiteLLM's bundled price map (model_prices_and_context_window_backup.json,
which tracks the vendors' published price pages), converted exactly to
integer pico-USD by the same parser as `Catalog.from_litellm`. This script
only *selects* models (the documented lists below), adds dated snapshots, and
names aliases.

    python -m p402core._catalog_build [path/to/model_prices.json] [--taken YYYY-MM-DD]

Without a path it uses the map bundled with the installed `litellm` package.

Snapshots: for each selected model, every `<name>-YYYY-MM-DD` /
`<name>-YYYYMMDD` key of the same provider in the map becomes an alias when
its prices are identical, and an entry of its own when they differ (e.g.
gpt-4o-2024-05-13 is dearer than gpt-4o).

OpenRouter: OpenRouter bills the underlying provider's list price per token, so
its names ("anthropic/claude-sonnet-4.5", "openrouter/…") are aliases of the
vendor's entry (OPENROUTER_ALIASES); "openrouter/<vendor>/<model>" resolves
by prefix stripping at lookup time.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import re
import sys

from p402core import _litellm

# The selection, by vendor. Names are LiteLLM keys (so lookups by the names
# gateways already use hit exactly).
SELECTION = {
    "OpenAI": [
        "gpt-5.5", "gpt-5.5-pro", "gpt-5.4", "gpt-5.4-pro", "gpt-5.4-mini", "gpt-5.4-nano",
        "gpt-5.2", "gpt-5.1", "gpt-5", "gpt-5-mini", "gpt-5-nano", "gpt-5-codex",
        "gpt-4.1", "gpt-4.1-mini", "gpt-4.1-nano", "gpt-4o", "gpt-4o-mini",
        "o1", "o3", "o3-pro", "o3-mini", "o4-mini",
        "text-embedding-3-small", "text-embedding-3-large",
        "azure/gpt-4o", "azure/gpt-4.1", "azure/gpt-5",
        # audio, images and video: priced per second, character, image or token kind
        "gpt-audio", "gpt-realtime", "whisper-1", "gpt-4o-transcribe",
        "gpt-4o-mini-transcribe", "tts-1", "tts-1-hd", "gpt-4o-mini-tts",
        *(f"{q}/{size}/gpt-image-1" for q in ("low", "medium", "high")
          for size in ("1024-x-1024", "1024-x-1536", "1536-x-1024")),
        *(f"{q}/{size}/gpt-image-1-mini" for q in ("low", "medium")
          for size in ("1024-x-1024", "1024-x-1536", "1536-x-1024")),
        "sora-2", "sora-2-pro",
    ],
    "Anthropic": [
        "claude-opus-5", "claude-sonnet-5", "claude-opus-4-8", "claude-opus-4-7",
        "claude-opus-4-6", "claude-opus-4-5", "claude-sonnet-4-6", "claude-sonnet-4-5",
        "claude-haiku-4-5",
        "anthropic.claude-opus-4-7", "anthropic.claude-haiku-4-5-20251001-v1:0",
    ],
    "Google": [
        "gemini/gemini-3.1-pro-preview", "gemini/gemini-3.5-flash", "gemini/gemini-3-flash-preview",
        "gemini/gemini-3.1-flash-lite", "gemini/gemini-2.5-pro", "gemini/gemini-2.5-flash",
        "gemini/gemini-2.5-flash-lite", "gemini/gemma-3-27b-it",
    ],
    "Mistral": [
        "mistral/mistral-large-latest", "mistral/mistral-medium-latest",
        "mistral/mistral-small-latest", "mistral/magistral-medium-latest",
        "mistral/codestral-latest", "mistral/devstral-latest", "mistral/ministral-8b-latest",
        "mistral/open-mistral-nemo",
    ],
    "Meta Llama": [
        "together_ai/meta-llama/Llama-3.3-70B-Instruct-Turbo",
        "together_ai/meta-llama/Llama-4-Scout-17B-16E-Instruct",
        "together_ai/meta-llama/Meta-Llama-3.1-8B-Instruct-Turbo",
        "together_ai/meta-llama/Llama-3.1-405B-Instruct",
        "fireworks_ai/accounts/fireworks/models/llama-v3p3-70b-instruct",
        "fireworks_ai/accounts/fireworks/models/llama4-maverick-instruct-basic",
        "fireworks_ai/accounts/fireworks/models/llama4-scout-instruct-basic",
        "meta.llama3-3-70b-instruct-v1:0", "meta.llama4-maverick-17b-instruct-v1:0",
        "cerebras/llama-3.3-70b", "deepinfra/meta-llama/Llama-3.3-70B-Instruct-Turbo",
    ],
    "DeepSeek": [
        "deepseek/deepseek-v4-pro", "deepseek/deepseek-v4-flash", "deepseek/deepseek-chat",
        "deepseek/deepseek-reasoner",
    ],
    "xAI": ["xai/grok-4.5", "xai/grok-4.3", "xai/grok-4.20", "xai/grok-code-fast-1"],
    "Cohere": ["command-a-03-2025", "command-r-plus-08-2024", "command-r-08-2024",
               "command-r7b-12-2024", "rerank-v3.5"],
    "Open weights on fast hosts": ["groq/openai/gpt-oss-120b", "groq/openai/gpt-oss-20b"],
}

# Extra names for selected models (same price by definition).
ALIASES = {
    "command-a": "command-a-03-2025",
    "command-r-plus": "command-r-plus-08-2024",
    "command-r": "command-r-08-2024",
    "command-r7b": "command-r7b-12-2024",
    "llama-3.3-70b-instruct": "together_ai/meta-llama/Llama-3.3-70B-Instruct-Turbo",
    "llama-4-scout": "together_ai/meta-llama/Llama-4-Scout-17B-16E-Instruct",
    "llama-4-maverick": "fireworks_ai/accounts/fireworks/models/llama4-maverick-instruct-basic",
}

# OpenRouter model ids -> the vendor entry they bill at.
OPENROUTER_ALIASES = {
    "anthropic/claude-opus-4.7": "claude-opus-4-7",
    "anthropic/claude-opus-4.6": "claude-opus-4-6",
    "anthropic/claude-opus-4.5": "claude-opus-4-5",
    "anthropic/claude-sonnet-4.6": "claude-sonnet-4-6",
    "anthropic/claude-sonnet-4.5": "claude-sonnet-4-5",
    "anthropic/claude-haiku-4.5": "claude-haiku-4-5",
    "google/gemini-2.5-pro": "gemini/gemini-2.5-pro",
    "google/gemini-2.5-flash": "gemini/gemini-2.5-flash",
    "google/gemini-3.1-pro-preview": "gemini/gemini-3.1-pro-preview",
    "meta-llama/llama-3.3-70b-instruct": "together_ai/meta-llama/Llama-3.3-70B-Instruct-Turbo",
    "meta-llama/llama-4-scout": "together_ai/meta-llama/Llama-4-Scout-17B-16E-Instruct",
    "meta-llama/llama-4-maverick": "fireworks_ai/accounts/fireworks/models/llama4-maverick-instruct-basic",
    "mistralai/mistral-large": "mistral/mistral-large-latest",
    "mistralai/mistral-medium-3": "mistral/mistral-medium-latest",
    "mistralai/mistral-small": "mistral/mistral-small-latest",
    "mistralai/codestral": "mistral/codestral-latest",
    "x-ai/grok-4.3": "xai/grok-4.3",
    "x-ai/grok-code-fast-1": "xai/grok-code-fast-1",
    "cohere/command-a": "command-a-03-2025",
    "deepseek/deepseek-v4-pro": None,  # already a LiteLLM key (selected): no alias needed
}

_SNAPSHOT = re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{8})$")


def bundled_map_path() -> str:
    import importlib.util

    spec = importlib.util.find_spec("litellm")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("litellm is not installed: pass the path of a LiteLLM price map")
    return os.path.join(list(spec.submodule_search_locations)[0],
                        "model_prices_and_context_window_backup.json")


def _same_price(a: dict, b: dict) -> bool:
    keys = ("input_pico", "output_pico", "cached_input_pico", "cache_write_pico",
            "reasoning_pico", "tiers")
    return all(a.get(k) == b.get(k) for k in keys)


def build(mapping: dict, *, taken: str) -> dict:
    """The default catalog as a `Catalog.from_dict` dict."""
    rounded: list = []
    selected = [name for names in SELECTION.values() for name in names]
    prices: dict = {}
    aliases: dict = {}
    missing = [n for n in selected if n not in mapping]
    if missing:
        raise SystemExit(f"selected models missing from the price map: {missing}")
    for name in selected:
        price = _litellm.entry_to_price(name, mapping[name], rounded)
        if price is None:
            raise SystemExit(f"{name}: no per-token price in the map")
        prices[name] = price
    # dated snapshots of the selected names (same provider)
    for key in sorted(mapping):
        m = _SNAPSHOT.search(key)
        if not m or key in prices or not isinstance(mapping[key], dict):
            continue
        base = key[: m.start()]
        if base not in prices or mapping[key].get("litellm_provider") != prices[base]["provider"]:
            continue
        snap = _litellm.entry_to_price(key, mapping[key], rounded)
        if snap is None:
            continue
        if _same_price(snap, prices[base]):
            aliases[key] = base
        else:
            prices[key] = snap
    for alias, target in {**ALIASES, **OPENROUTER_ALIASES}.items():
        if target is None:
            continue
        if target not in prices:
            raise SystemExit(f"alias {alias!r} names unselected model {target!r}")
        if alias not in prices:
            aliases[alias] = target
    if rounded:
        raise SystemExit(f"sub-pico prices in the selection (would be rounded): {rounded}")
    digest = hashlib.sha256(json.dumps([prices, aliases], sort_keys=True).encode()).hexdigest()[:8]
    return {
        "version": f"p402-default-{taken}-{digest}",
        "taken": taken,
        "source": ("LiteLLM public price map model_prices_and_context_window_backup.json "
                   f"(litellm {_litellm_version()}), selected by p402core/_catalog_build.py; "
                   "prices are integer pico-USD per token"),
        "prices": [prices[k] for k in sorted(prices)],
        "aliases": {k: aliases[k] for k in sorted(aliases)},
    }


def _litellm_version() -> str:
    try:
        from importlib.metadata import version

        return version("litellm")
    except Exception:  # pragma: no cover - litellm absent: the map came from a path
        return "unknown"


def dumps(catalog: dict) -> str:
    """Compact, human-readable JSON: one model (or alias) per line."""
    lines = ["{"]
    for key in ("version", "taken", "source"):
        lines.append(f"  {json.dumps(key)}: {json.dumps(catalog[key])},")
    lines.append('  "prices": [')
    rows = [json.dumps(p, separators=(", ", ": ")) for p in catalog["prices"]]
    lines.extend(f"    {r}," for r in rows[:-1])
    lines.append(f"    {rows[-1]}")
    lines.append("  ],")
    lines.append('  "aliases": {')
    items = [f"    {json.dumps(k)}: {json.dumps(v)}" for k, v in catalog["aliases"].items()]
    lines.append(",\n".join(items))
    lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path", nargs="?", help="LiteLLM price map JSON (default: the bundled one)")
    ap.add_argument("--taken", help="ISO date the prices were taken (default: the map file's date)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "data", "default_catalog.json"))
    args = ap.parse_args(argv)
    path = args.path or bundled_map_path()
    with open(path, encoding="utf-8") as fh:
        mapping = json.load(fh)
    taken = args.taken or _dt.datetime.fromtimestamp(
        os.path.getmtime(path), _dt.timezone.utc).date().isoformat()
    catalog = build(mapping, taken=taken)
    with open(args.out, "w", encoding="utf-8") as fh:
        fh.write(dumps(catalog))
    print(f"wrote {args.out}: {len(catalog['prices'])} prices, {len(catalog['aliases'])} aliases,"
          f" version {catalog['version']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
