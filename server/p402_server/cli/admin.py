"""Commands that administer a tenant through AdminService: `keys`, `budgets`,
`policies`, `prices`, `settings` and `pricebook`."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from p402_server.amounts import Money
from p402_server.cli.common import (
    EFFECTS,
    OWNER_KEYS,
    PERIODS,
    PRIVACY_MODES,
    UsageError,
    _client,
    _fmt,
    _json_flag,
    _read_text,
    _remote,
    command_group,
    parse_int,
    parse_scope,
    parse_usd,
)
from p402_server.cli.output import Output, _ms_str, _per_million, usd, usd_short

# Where a LiteLLM price map comes from: the file bundled in the litellm package, or
# the one LiteLLM's repository publishes (the package's copy is a backup of it).
LITELLM_BUNDLED_MAP = "model_prices_and_context_window_backup.json"


LITELLM_MAP_URL = ("https://raw.githubusercontent.com/BerriAI/litellm/main/"
                   "model_prices_and_context_window.json")


def _key_row(k: Any) -> list[Any]:
    return [k.key_id, k.name, k.prefix + "…", ",".join(s.lower() for s in k.scopes),
            _ms_str(k.create_time_ms), _ms_str(k.revoke_time_ms) or "active"]


_KEY_COLS = ["key id", "name", "prefix", "scopes", "created (UTC)", "revoked (UTC)"]


def cmd_keys_create(args: argparse.Namespace, out: Output) -> int:
    scopes = args.scope or ["meter"]
    with _client(args) as p402:
        created = p402.create_key(args.name, scopes)
    if args.json:
        out.json(created.to_dict())
        return 0
    out.print(f"Key {created.key.key_id} ({', '.join(scopes)}) created. "
              "Shown once, store it now:")
    out.print(created.api_key, markup=False)
    return 0


def cmd_keys_list(args: argparse.Namespace, out: Output) -> int:
    with _client(args) as p402:
        keys = list(p402.paginate(p402.list_keys))
    if args.json:
        out.json([k.to_dict() for k in keys])
        return 0
    out.table("API keys", _KEY_COLS, (_key_row(k) for k in keys),
              drop=("prefix", "created (UTC)"))
    return 0


def cmd_keys_revoke(args: argparse.Namespace, out: Output) -> int:
    with _client(args) as p402:
        key = p402.revoke_key(args.key_id)
    if args.json:
        out.json(key.to_dict())
    else:
        out.print(f"Key {key.key_id} revoked.")
    return 0


def cmd_pricebook_set(args: argparse.Namespace, out: Output) -> int:
    text = _read_text("FILE", args.file)
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise UsageError("FILE", f"not JSON: {exc}") from None
    with _client(args) as p402:
        book = p402.put_price_book(doc)
    out.json(book)
    return 0


def cmd_pricebook_show(args: argparse.Namespace, out: Output) -> int:
    with _client(args) as p402:
        out.json(p402.get_price_book())
    return 0


def cmd_keys_evidence(args: argparse.Namespace, out: Output) -> int:
    with _client(args) as p402:
        data = p402.rotate_evidence_key() if args.rotate else p402.evidence_keys()
    out.json(data)
    return 0


def _budget_dict(b: Any) -> dict[str, Any]:
    d = b.to_dict()
    d["limit_usd"] = usd(b.limit_nanos)
    d["soft_limit_usd"] = usd(b.soft_limit_nanos)
    return d


def cmd_budgets_set(args: argparse.Namespace, out: Output) -> int:
    limit = parse_usd("--limit", args.limit)
    soft = parse_usd("--soft-limit", args.soft_limit) if args.soft_limit else 0
    if soft and soft > limit:
        raise UsageError("--soft-limit", "must not exceed --limit")
    scope = parse_scope("--scope", args.scope)
    with _client(args) as p402:
        budget = p402.put_budget(args.budget_id, limit_nanos=limit, period=args.period,
                                 soft_limit_nanos=soft,
                                 enforcement="SOFT" if args.soft else "HARD",
                                 scope=scope)
    if args.json:
        out.json(_budget_dict(budget))
    else:
        where = ", ".join(f"{k}={v}" for k, v in budget.scope.items()) or "whole tenant"
        out.print(f"Budget {budget.budget_id}: {usd_short(budget.limit_nanos)} per "
                  f"{budget.period.lower()} ({budget.enforcement}), scope {where}.")
    return 0


def cmd_budgets_list(args: argparse.Namespace, out: Output) -> int:
    with _client(args) as p402:
        budgets = list(p402.paginate(p402.list_budgets))
    if args.json:
        out.json([_budget_dict(b) for b in budgets])
        return 0

    def row(b: Any) -> list[Any]:
        st = b.status
        return [b.budget_id,
                ", ".join(f"{k}={v}" for k, v in b.scope.items()) or "(tenant)",
                b.period.lower(), b.enforcement.lower(), Money(b.limit_nanos),
                Money(b.soft_limit_nanos) if b.soft_limit_nanos else "",
                Money(st.committed_nanos) if st else "",
                Money(st.held_nanos) if st else "",
                Money(st.remaining_nanos) if st else ""]

    out.table("Budgets", ["id", "scope", "period", "enforcement", ("limit", "right"),
                          ("soft limit", "right"), ("committed", "right"),
                          ("held", "right"), ("remaining", "right")],
              (row(b) for b in budgets), drop=("soft limit", "period", "held", "scope"))
    return 0


def cmd_budgets_delete(args: argparse.Namespace, out: Output) -> int:
    with _client(args) as p402:
        p402.delete_budget(args.budget_id)
    out.print(f"Budget {args.budget_id} deleted.")
    return 0


def _rule_dict(r: Any) -> dict[str, Any]:
    d = r.to_dict()
    d["max_cost_usd"] = usd(r.max_cost_nanos)
    return d


def cmd_policies_set(args: argparse.Namespace, out: Output) -> int:
    kw: dict[str, Any] = {
        "owners": parse_scope("--match", args.match),
        "models": args.model or (),
        "providers": args.provider or (),
        "privacy_modes": args.privacy_mode or (),
        "require_owners": args.require_owner or (),
        "allow_models": args.allow_model or (),
        "allowed_privacy_modes": args.allowed_privacy_mode or (),
        "per": args.per,
        "message": args.message,
    }
    effect = args.effect
    if args.max_output_tokens is not None:
        kw["max_output_tokens"] = parse_int("--max-output-tokens", args.max_output_tokens,
                                            minimum=1)
    if args.max_cost is not None:
        kw["max_cost_nanos"] = parse_usd("--max-cost", args.max_cost)
    if effect == "rate_limit" or args.rate_limit is not None:
        if args.rate_limit is None:
            raise UsageError("--rate-limit", "is required with --effect rate_limit")
        kw["rate_limit"] = (parse_usd("--rate-limit", args.rate_limit)
                            if args.rate_unit == "cost"
                            else parse_int("--rate-limit", args.rate_limit, minimum=1))
        kw["rate_unit"] = args.rate_unit
        kw["window_seconds"] = parse_int("--window", args.window, minimum=1)
    required = {"require_owners": "--require-owner", "allow_models": "--allow-model",
                "max_output_tokens": "--max-output-tokens",
                "max_cost_per_request": "--max-cost",
                "privacy": "--allowed-privacy-mode"}
    needs = {"require_owners": kw["require_owners"], "allow_models": kw["allow_models"],
             "max_output_tokens": kw.get("max_output_tokens"),
             "max_cost_per_request": kw.get("max_cost_nanos"),
             "privacy": kw["allowed_privacy_modes"]}
    if effect in needs and not needs[effect]:
        raise UsageError(required[effect], f"is required with --effect {effect}")
    with _client(args) as p402:
        rule = p402.put_policy_rule(args.rule_id, effect, **kw)
    if args.json:
        out.json(_rule_dict(rule))
    else:
        out.print(f"Rule {rule.rule_id} ({rule.effect}) saved.")
    return 0


def _rule_summary(r: Any) -> str:
    parts = []
    if r.require_owners:
        parts.append("require " + ",".join(r.require_owners))
    if r.allow_models:
        parts.append("models " + ",".join(r.allow_models))
    if r.max_output_tokens:
        parts.append(f"max output {r.max_output_tokens}")
    if r.max_cost_nanos:
        parts.append(f"max cost {usd_short(r.max_cost_nanos)}")
    if r.rate_limit:
        amount = usd_short(r.rate_limit) if r.rate_unit == "COST" else str(r.rate_limit)
        per = f" per {r.per}" if r.per else ""
        parts.append(f"{amount} {r.rate_unit.lower()}/{r.window_seconds}s{per}")
    if r.allowed_privacy_modes:
        parts.append("privacy " + ",".join(m.lower() for m in r.allowed_privacy_modes))
    if r.message:
        parts.append(repr(r.message))
    return "; ".join(parts)


def cmd_policies_list(args: argparse.Namespace, out: Output) -> int:
    with _client(args) as p402:
        rules = list(p402.paginate(p402.list_policy_rules))
    if args.json:
        out.json([_rule_dict(r) for r in rules])
        return 0

    def match(r: Any) -> str:
        bits = [f"{k}={v}" for k, v in r.owners.items()]
        bits += [f"model={m}" for m in r.models] + [f"provider={p}" for p in r.providers]
        bits += [f"privacy={m.lower()}" for m in r.privacy_modes]
        return ", ".join(bits) or "(all calls)"

    out.table("Policy rules", ["id", "effect", "match", "parameters"],
              ([r.rule_id, r.effect.lower(), match(r), _rule_summary(r)] for r in rules))
    return 0


def cmd_policies_delete(args: argparse.Namespace, out: Output) -> int:
    with _client(args) as p402:
        p402.delete_policy_rule(args.rule_id)
    out.print(f"Rule {args.rule_id} deleted.")
    return 0


def _load_rules(path: str) -> list[dict[str, Any]]:
    from p402_client.types import PolicyRule

    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
    except OSError as exc:
        raise UsageError("FILE", f"{path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise UsageError("FILE", f"{path}: not JSON ({exc.msg} at line {exc.lineno})") from None
    rules = doc.get("rules") if isinstance(doc, dict) else doc
    if not isinstance(rules, list):
        raise UsageError("FILE", f"{path}: expected a list of rules or {{\"rules\": [...]}}")
    allowed = set(PolicyRule.__dataclass_fields__) | {"max_cost"}
    out = []
    for i, rule in enumerate(rules):
        where = f"rules[{i}]"
        if not isinstance(rule, dict):
            raise UsageError(where, "must be an object")
        unknown = sorted(set(rule) - allowed)
        if unknown:
            raise UsageError(f"{where}.{unknown[0]}", "unknown rule field")
        for key in ("rule_id", "effect"):
            if not rule.get(key):
                raise UsageError(f"{where}.{key}", "is required")
        rule = dict(rule)
        if "max_cost" in rule:  # money in files is a USD string, as on the command line
            rule["max_cost_nanos"] = parse_usd(f"{where}.max_cost", str(rule.pop("max_cost")))
        out.append(rule)
    ids = [r["rule_id"] for r in out]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise UsageError("FILE", f"rule_id {dupes[0]!r} appears twice")
    return out


def cmd_policies_load(args: argparse.Namespace, out: Output) -> int:
    from p402_client import InvalidArgument

    rules = _load_rules(args.file)
    deleted: list[str] = []
    with _client(args) as p402:
        for i, rule in enumerate(rules):
            rule = dict(rule)
            try:
                p402.put_policy_rule(rule.pop("rule_id"), rule.pop("effect"), **rule)
            except InvalidArgument as exc:
                raise UsageError(f"rules[{i}].{exc.field.removeprefix('rule.')}",
                                 exc.message.split(": ", 1)[-1]) from None
            except TypeError as exc:
                raise UsageError(f"rules[{i}]", str(exc)) from None
        if args.replace:
            keep = {r["rule_id"] for r in rules}
            for existing in list(p402.paginate(p402.list_policy_rules)):
                if existing.rule_id not in keep:
                    p402.delete_policy_rule(existing.rule_id)
                    deleted.append(existing.rule_id)
    if args.json:
        out.json({"loaded": [r["rule_id"] for r in rules], "deleted": deleted})
    else:
        out.print(f"Loaded {len(rules)} rule(s) from {args.file}"
                  + (f"; deleted {len(deleted)}: {', '.join(deleted)}" if deleted else "")
                  + ".")
    return 0


def litellm_bundled_map() -> Path:
    """The price map inside the installed `litellm` package (found without importing
    litellm, which is slow); UsageError when litellm is not installed."""
    import importlib.util

    spec = importlib.util.find_spec("litellm")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError("--from-litellm-package", "the litellm package is not installed "
                         "(pip install litellm, or pip install -e '.[litellm]' in a "
                         "checkout), or download LiteLLM's map: "
                         f"curl -sSLO {LITELLM_MAP_URL}")
    for where in spec.submodule_search_locations:
        path = Path(where) / LITELLM_BUNDLED_MAP
        if path.is_file():
            return path
    raise UsageError("--from-litellm-package", f"this litellm has no {LITELLM_BUNDLED_MAP}; "
                     f"download LiteLLM's map instead: curl -sSLO {LITELLM_MAP_URL}")


def cmd_prices_import(args: argparse.Namespace, out: Output) -> int:
    path = litellm_bundled_map() if args.from_litellm_package else Path(args.file)
    try:
        data = path.read_bytes()
    except OSError as exc:
        hint = ""
        if exc.errno == 2:
            hint = (f" (LiteLLM's map: --from-litellm-package, or download "
                    f"{LITELLM_MAP_URL})")
        raise UsageError("FILE", f"{path}: {exc.strerror}{hint}") from None
    with _client(args) as p402:
        result = p402.import_prices(data, format=args.format)
    if args.json:
        out.json(result.to_dict())
        return 0
    out.print(f"Imported {result.imported_count} price(s) from {path}; catalog "
              f"{result.catalog_version}; skipped {len(result.skipped)}.")
    for line in result.skipped[:10]:
        out.print(f"  skipped {line}", markup=False)
    if len(result.skipped) > 10:
        out.print(f"  … and {len(result.skipped) - 10} more (see --json)")
    return 0


def cmd_prices_list(args: argparse.Namespace, out: Output) -> int:
    with _client(args) as p402:
        prices = list(p402.paginate(p402.list_prices, model_filter=args.model))
    if args.json:
        out.json([p.to_dict() for p in prices])
        return 0
    out.table("Prices (USD per 1M tokens)",
              ["model", "provider", ("input", "right"), ("cached input", "right"),
               ("output", "right"), ("max output", "right"), "override"],
              ([p.model, p.provider, _per_million(p.input_pico_per_token),
                _per_million(p.cached_input_pico_per_token),
                _per_million(p.output_pico_per_token), p.max_output_tokens or "",
                "yes" if p.tenant_override else ""] for p in prices),
              drop=("max output", "cached input", "provider"))
    return 0


def cmd_settings_get(args: argparse.Namespace, out: Output) -> int:
    with _client(args) as p402:
        settings = p402.get_settings()
    _print_settings(args, out, settings)
    return 0


def _print_settings(args: argparse.Namespace, out: Output, settings: Any) -> None:
    if args.json:
        out.json(settings.to_dict())
        return
    out.table("Settings", ["setting", "value"],
              ([k, str(v).lower() if isinstance(v, bool) else v]
               for k, v in settings.to_dict().items()))


def cmd_settings_set(args: argparse.Namespace, out: Output) -> int:
    fields: dict[str, Any] = {}
    for name, flag in (("hold_ttl_seconds", "--hold-ttl"),
                       ("default_output_tokens", "--default-output-tokens"),
                       ("fallback_input_pico_per_token", "--fallback-input-pico-per-token"),
                       ("fallback_output_pico_per_token",
                        "--fallback-output-pico-per-token")):
        value = getattr(args, name)
        if value is not None:
            fields[name] = parse_int(flag, value, minimum=0)
    if args.default_privacy_mode:
        fields["default_privacy_mode"] = args.default_privacy_mode
    for name in ("allow_clamp", "allow_unknown_models"):
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    if not fields:
        raise UsageError("settings set", "give at least one setting to change "
                                         "(e.g. --hold-ttl 600)")
    with _client(args) as p402:
        settings = p402.update_settings(**fields)
    _print_settings(args, out, settings)
    return 0


def add_keys(sub) -> None:
    """`p402 keys` and its flags."""
    ks = command_group(sub, "keys", help="API keys", **_fmt(
        "Create, list and revoke API keys (scopes: meter, read, admin).",
        "p402 keys create --scope meter --name gateway-prod"))
    p = ks.add_parser("create", help="create a key (printed once)", **_fmt(
        "Create a key; the key itself is printed this once.",
        "p402 keys create --scope meter --scope read --name gateway"))
    p.add_argument("--scope", action="append", choices=("meter", "read", "admin"),
                   type=str.lower, help="scope (repeatable; default meter)")
    p.add_argument("--name", default="", help="a name to recognise the key")
    _remote(p)
    _json_flag(p)
    p.set_defaults(func=cmd_keys_create)
    p = ks.add_parser("list", help="list keys", **_fmt("List the tenant's keys.",
                                                       "p402 keys list --json"))
    _remote(p)
    _json_flag(p)
    p.set_defaults(func=cmd_keys_list)
    p = ks.add_parser("revoke", help="revoke a key", **_fmt(
        "Revoke a key; it fails on its next call.", "p402 keys revoke key_01J…"))
    p.add_argument("key_id")
    _remote(p)
    _json_flag(p)
    p.set_defaults(func=cmd_keys_revoke)
    p = ks.add_parser("evidence", help="the tenant's evidence keys (receipts, exports)", **_fmt(
        "The tenant's evidence keys: Ed25519 keys that sign receipts and export "
        "digests. --public prints the public key set (JSON Web Keys) anyone needs to "
        "verify them, the same as /.well-known/p402-keys.json?tenant=ID on the HTTP "
        "port; --rotate makes a new active key (admin) and keeps the old one "
        "published as retired, so what it signed still verifies.",
        "p402 keys evidence --public > keys.json"))
    g = p.add_mutually_exclusive_group()
    g.add_argument("--public", action="store_true",
                   help="print the public key set as JSON (the default)")
    g.add_argument("--rotate", action="store_true", help="rotate the active key (admin)")
    _remote(p)
    p.set_defaults(func=cmd_keys_evidence)


def add_pricebook(sub) -> None:
    """`p402 pricebook` and its flags."""
    pbs = command_group(sub, "pricebook", help="what the tenant charges its customers", **_fmt(
        "The tenant's price book: cost-plus percentages, per-model sell prices (per "
        "token and per unit), per-customer overrides and a minimum per call. A Record "
        "that carries no revenue is sold at it, so margin per customer and feature is "
        "complete. The document's format is in server/p402_server/ledger/pricebook.py.",
        "p402 pricebook set book.json && p402 pricebook show"))
    p = pbs.add_parser("set", help="replace the price book (admin)", **_fmt(
        "Replace the price book with a JSON file ({} removes it). Example file: "
        '{"markup_pct": "20", "min_per_call_usd": "0.0005", "models": {"gpt-4o": '
        '{"markup_pct": "35"}}, "customers": {"acme": {"markup_pct": "10"}}}',
        "p402 pricebook set book.json"))
    p.add_argument("file", metavar="FILE", help="the price book (JSON), or - for stdin")
    _remote(p)
    p.set_defaults(func=cmd_pricebook_set)
    p = pbs.add_parser("show", help="print the price book and its version", **_fmt(
        "Print the price book (JSON) with its version.", "p402 pricebook show"))
    _remote(p)
    p.set_defaults(func=cmd_pricebook_show)


def add_budgets(sub) -> None:
    """`p402 budgets` and its flags."""
    bs = command_group(sub, "budgets", help="budgets", **_fmt(
        "Create, list and delete budgets. Money in USD.",
        "p402 budgets set acme-monthly --limit 25.00 --scope customer=acme"))
    p = bs.add_parser("set", help="create or replace a budget", **_fmt(
        "Create or replace a budget. A HARD budget denies calls past its limit; "
        "--soft only warns. A budget created in the middle of a period starts from the "
        "spend already in the ledger for its scope and period (not from zero); "
        "replacing one (a new limit) keeps what its period has committed.",
        "p402 budgets set acme-monthly --limit 25.00 --period month --soft-limit 20 "
        "--scope customer=acme --scope label.env=prod"))
    p.add_argument("budget_id", metavar="ID")
    p.add_argument("--limit", required=True, help="limit in USD, e.g. 25.00")
    p.add_argument("--period", default="month", choices=PERIODS, type=str.lower,
                   help="UTC calendar period (default month)")
    p.add_argument("--soft-limit", default=None, help="warn above this (USD)")
    p.add_argument("--soft", action="store_true",
                   help="enforcement SOFT: warn instead of deny at the limit")
    p.add_argument("--scope", action="append", metavar="KEY=VALUE",
                   help="owner dimension or label.<key> that must match (repeatable; "
                        "none = the whole tenant)")
    _remote(p)
    _json_flag(p)
    p.set_defaults(func=cmd_budgets_set)
    p = bs.add_parser("list", help="list budgets and where they stand", **_fmt(
        "List budgets with committed, held and remaining amounts.",
        "p402 budgets list"))
    _remote(p)
    _json_flag(p)
    p.set_defaults(func=cmd_budgets_list)
    p = bs.add_parser("delete", help="delete a budget", **_fmt(
        "Delete a budget.", "p402 budgets delete acme-monthly"))
    p.add_argument("budget_id", metavar="ID")
    _remote(p)
    p.set_defaults(func=cmd_budgets_delete)


def add_policies(sub) -> None:
    """`p402 policies` and its flags."""
    ps = command_group(sub, "policies", help="policy rules", **_fmt(
        "Create, list, delete and load policy rules.",
        "p402 policies set rl-acme --effect rate_limit --rate-limit 60 --window 60 "
        "--per customer"))
    p = ps.add_parser("set", help="create or replace a rule", **_fmt(
        "Create or replace a policy rule: a match (owners, models, providers, "
        "privacy modes; all must hold) and an effect with its parameters.",
        "p402 policies set need-customer --effect require_owners --require-owner customer"))
    p.add_argument("rule_id", metavar="ID")
    p.add_argument("--effect", required=True, choices=EFFECTS, type=str.lower)
    p.add_argument("--match", action="append", metavar="KEY=VALUE",
                   help="owner dimension or label.<key> to match (repeatable)")
    p.add_argument("--model", action="append", metavar="GLOB",
                   help="models to match (repeatable; globs)")
    p.add_argument("--provider", action="append", help="providers to match (repeatable)")
    p.add_argument("--privacy-mode", action="append", choices=PRIVACY_MODES,
                   type=str.lower, help="privacy modes to match (repeatable)")
    p.add_argument("--require-owner", action="append", choices=OWNER_KEYS,
                   help="REQUIRE_OWNERS: owner dimension that must be set (repeatable)")
    p.add_argument("--allow-model", action="append", metavar="GLOB",
                   help="ALLOW_MODELS: allowed model globs (repeatable)")
    p.add_argument("--max-output-tokens", help="MAX_OUTPUT_TOKENS: the clamp")
    p.add_argument("--max-cost", help="MAX_COST_PER_REQUEST: USD per request")
    p.add_argument("--rate-limit",
                   help="RATE_LIMIT: requests or tokens per window (USD with "
                        "--rate-unit cost)")
    p.add_argument("--rate-unit", default="requests", choices=("requests", "tokens", "cost"),
                   type=str.lower, help="RATE_LIMIT unit (default requests)")
    p.add_argument("--window", "--window-seconds", dest="window", default="60",
                   help="RATE_LIMIT window in seconds (default 60)")
    p.add_argument("--per", default="", choices=("",) + OWNER_KEYS,
                   help="RATE_LIMIT: one bucket per value of this owner dimension")
    p.add_argument("--allowed-privacy-mode", action="append", choices=PRIVACY_MODES,
                   type=str.lower, help="PRIVACY: allowed modes (repeatable)")
    p.add_argument("--message", default="", help="message shown with the decision")
    _remote(p)
    _json_flag(p)
    p.set_defaults(func=cmd_policies_set)
    p = ps.add_parser("list", help="list rules", **_fmt("List policy rules.",
                                                        "p402 policies list --json"))
    _remote(p)
    _json_flag(p)
    p.set_defaults(func=cmd_policies_list)
    p = ps.add_parser("delete", help="delete a rule", **_fmt(
        "Delete a policy rule.", "p402 policies delete rl-acme"))
    p.add_argument("rule_id", metavar="ID")
    _remote(p)
    p.set_defaults(func=cmd_policies_delete)
    p = ps.add_parser("load", help="load rules from a JSON file", **_fmt(
        "Put every rule of a JSON file: a list of rules, or {\"rules\": [...]}. Keys "
        "are the rule fields (rule_id, effect, owners, models, require_owners, "
        "rate_limit, rate_unit, window_seconds, per, max_cost (USD string) …).",
        "p402 policies load policies.json --replace"))
    p.add_argument("file", metavar="FILE.json")
    p.add_argument("--replace", action="store_true",
                   help="also delete rules that are not in the file")
    _remote(p)
    _json_flag(p)
    p.set_defaults(func=cmd_policies_load)


def add_prices(sub) -> None:
    """`p402 prices` and its flags."""
    prs = command_group(sub, "prices", help="model prices", **_fmt(
        "Import tenant price overrides and list the effective prices.",
        "p402 prices import --from-litellm-package"))
    p = prs.add_parser("import", help="import a price map", **_fmt(
        "Import a price map as tenant overrides (LiteLLM's JSON format). Where the map "
        "comes from: the `litellm` package ships one "
        f"({LITELLM_BUNDLED_MAP} inside the package: --from-litellm-package reads "
        "it), and LiteLLM's repository publishes the current one as "
        f"{LITELLM_MAP_URL} (download it, then give its path). Any file name is fine.",
        "p402 prices import --from-litellm-package\n"
        f"  curl -sSLO {LITELLM_MAP_URL}\n"
        "  p402 prices import model_prices_and_context_window.json"))
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("file", metavar="FILE", nargs="?",
                   help="a LiteLLM price-map JSON file (any name)")
    g.add_argument("--from-litellm-package", action="store_true",
                   help=f"the map bundled with the installed litellm package "
                        f"({LITELLM_BUNDLED_MAP}; pip install litellm, or "
                        "pip install -e '.[litellm]' in a checkout)")
    p.add_argument("--format", default="litellm", choices=("litellm",))
    _remote(p)
    _json_flag(p)
    p.set_defaults(func=cmd_prices_import)
    p = prs.add_parser("list", help="list prices", **_fmt(
        "List prices per million tokens.", "p402 prices list --model gpt-4o"))
    p.add_argument("--model", default="", help="substring of the model name")
    _remote(p)
    _json_flag(p)
    p.set_defaults(func=cmd_prices_list)


def add_settings(sub) -> None:
    """`p402 settings` and its flags."""
    ss = command_group(sub, "settings", help="tenant settings", **_fmt(
        "Show or change the tenant's settings.", "p402 settings set --hold-ttl 600"))
    p = ss.add_parser("get", help="show settings", **_fmt("Show the settings.",
                                                          "p402 settings get --json"))
    _remote(p)
    _json_flag(p)
    p.set_defaults(func=cmd_settings_get)
    p = ss.add_parser("set", help="change settings", **_fmt(
        "Change only the settings given.",
        "p402 settings set --hold-ttl 600 --allow-clamp"))
    p.add_argument("--hold-ttl", "--hold-ttl-seconds", dest="hold_ttl_seconds",
                   help="reservation lifetime in seconds")
    p.add_argument("--default-output-tokens", help="output cap when a call gives none")
    p.add_argument("--default-privacy-mode", choices=PRIVACY_MODES, type=str.lower)
    p.add_argument("--allow-clamp", action=argparse.BooleanOptionalAction, default=None,
                   help="answer ALLOW with a smaller output cap instead of DENY")
    p.add_argument("--allow-unknown-models", action=argparse.BooleanOptionalAction,
                   default=None, help="price unknown models at the fallback price")
    p.add_argument("--fallback-input-pico-per-token",
                   help="fallback input price (pico-USD per token)")
    p.add_argument("--fallback-output-pico-per-token",
                   help="fallback output price (pico-USD per token)")
    _remote(p)
    _json_flag(p)
    p.set_defaults(func=cmd_settings_set)
