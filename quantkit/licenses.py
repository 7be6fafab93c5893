"""Licences: what a base model's licence allows a quantisation to do, in families with rules.

:func:`license_info` sorts a licence into a family: Llama community licences (names must begin with "Llama",
"Built with Llama", acceptable-use policy), Gemma terms, non-commercial / no-derivatives licences (loud warning;
``--public`` refused without ``--accept-license-terms``) and unknown licences (pushing refused without
``--license``); :func:`check_license` applies the rules; :func:`stricter_license` picks the licence of a model made
of two licensed parts (base + LoRA adapter). Facts, below everything that writes a card or pushes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from quantkit.errors import QuantkitError

LLAMA = {  # Hub licence id -> (licence title, licence link, acceptable-use policy link, name rule)
    "llama2": ("Llama 2 Community License", "https://ai.meta.com/llama/license/",
               "https://ai.meta.com/llama/use-policy/", False),
    "llama3": ("Meta Llama 3 Community License", "https://www.llama.com/llama3/license/",
               "https://www.llama.com/llama3/use-policy/", True),
    "llama3.1": ("Llama 3.1 Community License", "https://www.llama.com/llama3_1/license/",
                 "https://www.llama.com/llama3_1/use-policy/", True),
    "llama3.2": ("Llama 3.2 Community License", "https://www.llama.com/llama3_2/license/",
                 "https://www.llama.com/llama3_2/use-policy/", True),
    "llama3.3": ("Llama 3.3 Community License", "https://www.llama.com/llama3_3/license/",
                 "https://www.llama.com/llama3_3/use-policy/", True),
    "llama4": ("Llama 4 Community License", "https://www.llama.com/llama4/license/",
               "https://www.llama.com/llama4/use-policy/", True),
}

GEMMA = {"gemma": ("Gemma Terms of Use", "https://ai.google.dev/gemma/terms",
                   "https://ai.google.dev/gemma/prohibited_use_policy")}

NONCOMMERCIAL_IDS = {"cc-by-nc-2.0", "cc-by-nc-3.0", "cc-by-nc-4.0", "cc-by-nc-nd-3.0", "cc-by-nc-nd-4.0",
                     "cc-by-nc-sa-2.0", "cc-by-nc-sa-3.0", "cc-by-nc-sa-4.0", "apple-amlr", "deepfloyd-if-license",
                     "fair-noncommercial-research-license", "c-uda"}

NO_DERIVATIVES_IDS = {"cc-by-nd-4.0", "cc-by-nc-nd-3.0", "cc-by-nc-nd-4.0"}

# Licence ids the Hub knows (https://huggingface.co/docs/hub/repositories-licenses) that carry no special rule here.
OPEN_IDS = {
    "apache-2.0", "mit", "openrail", "bigscience-openrail-m", "creativeml-openrail-m", "bigscience-bloom-rail-1.0",
    "bigcode-openrail-m", "afl-3.0", "artistic-2.0", "bsl-1.0", "bsd", "bsd-2-clause", "bsd-3-clause",
    "bsd-3-clause-clear", "c-uda", "cc", "cc0-1.0", "cc-by-2.0", "cc-by-2.5", "cc-by-3.0", "cc-by-4.0",
    "cc-by-sa-3.0", "cc-by-sa-4.0", "cdla-sharing-1.0", "cdla-permissive-1.0", "cdla-permissive-2.0", "wtfpl",
    "ecl-2.0", "epl-1.0", "epl-2.0", "etalab-2.0", "eupl-1.1", "eupl-1.2", "agpl-3.0", "gfdl", "gpl", "gpl-2.0",
    "gpl-3.0", "lgpl", "lgpl-2.1", "lgpl-3.0", "isc", "h-research", "intel-research", "lppl-1.3c", "ms-pl",
    "mpl-2.0", "odc-by", "odbl", "openrail++", "osl-3.0", "postgresql", "ofl-1.1", "ncsa", "unlicense", "zlib",
    "pddl", "lgpl-lr", "unknown", "other", "llama2", "llama3", "llama3.1", "llama3.2", "llama3.3", "llama4",
    "gemma", "cc-by-nc-2.0", "cc-by-nc-3.0", "cc-by-nc-4.0", "cc-by-nc-nd-3.0", "cc-by-nc-nd-4.0",
    "cc-by-nc-sa-2.0", "cc-by-nc-sa-3.0", "cc-by-nc-sa-4.0", "cc-by-nd-4.0", "apple-amlr", "deepfloyd-if-license",
    "fair-noncommercial-research-license", "mit-0", "cc-by-sa-2.0",
}

KNOWN_IDS = OPEN_IDS


@dataclass
class LicenseInfo:
    """What the card and the push need to know about a licence."""

    id: str | None
    name: str | None = None  # license_name (custom licences)
    link: str | None = None  # license_link
    family: str = "unknown"  # open | llama | gemma | noncommercial | custom | unknown
    title: str = ""
    policy_link: str | None = None
    name_prefix: str | None = None  # derivative names must begin with this ("Llama")
    attribution: str | None = None  # "Built with Llama"
    noncommercial: bool = False
    no_derivatives: bool = False
    source: str = "base"  # base | --license
    notes: list[str] = field(default_factory=list)

    @property
    def known(self) -> bool:
        return self.family != "unknown"

    def to_json(self) -> dict:
        return asdict(self)


def license_info(base: dict, override: str | None = None) -> LicenseInfo:
    """Classify the base model's licence (or ``override``, the ``--license`` given by the user)."""
    lic = override or base.get("license")
    if isinstance(lic, (list, tuple)):  # a card may list several; the first decides
        lic = lic[0] if lic else None
    lic = str(lic).strip() if lic else None
    if lic and lic.lower() in KNOWN_IDS:
        lic = lic.lower()  # the Hub's ids are lower case
    name = None if override else base.get("license_name")
    link = None if override else base.get("license_link")
    key = (lic or "").lower()
    info = LicenseInfo(id=lic, name=name, link=link, source="--license" if override else "base")
    name_l = (name or "").lower()
    if key in LLAMA or (key == "other" and "llama" in name_l):
        title, llink, policy, rule = LLAMA.get(key) or (name or "Llama Community License", link, None, True)
        info.family, info.title, info.policy_link = "llama", title, policy
        info.link = link or llink
        info.attribution = "Built with Llama"
        info.name_prefix = "Llama" if rule else None
        info.notes.append(f"{title}: keep a copy of the licence with the files, show \"Built with Llama\", "
                          "and follow the acceptable-use policy" + (
                              "; names of derived models must begin with \"Llama\"" if rule else ""))
    elif key in GEMMA or (key == "other" and "gemma" in name_l):
        title, glink, policy = GEMMA["gemma"]
        info.family, info.title, info.link, info.policy_link = "gemma", title, link or glink, policy
        info.notes.append("Gemma Terms of Use: pass the terms and the prohibited-use policy on to every user "
                          "and keep the notice that Gemma is provided under them")
    elif key in NONCOMMERCIAL_IDS or key.startswith("cc-by-nc") or \
            (key == "other" and any(w in name_l for w in ("non-commercial", "noncommercial", "research"))):
        info.family, info.noncommercial = "noncommercial", True
        info.title = name or lic or ""
        info.no_derivatives = key in NO_DERIVATIVES_IDS
        info.notes.append(f"{info.title} is a NON-COMMERCIAL licence: these files may not be used commercially"
                          + ("; it also forbids distributing derivatives (a quantisation is one)"
                             if info.no_derivatives else ""))
    elif key in NO_DERIVATIVES_IDS:
        info.family, info.no_derivatives, info.title = "noncommercial", True, lic or ""
        info.notes.append(f"{lic} forbids distributing derivatives, and a quantisation is one")
    elif key == "other" and (name or link):
        info.family, info.title = "custom", name or "custom licence"
        info.notes.append(f"custom licence {info.title!r}: read its terms ({link or 'see the base card'}) before "
                          "publishing")
    elif key and key not in ("unknown", "other") and key in KNOWN_IDS:
        info.family, info.title = "open", lic
    elif key and key not in ("unknown", "other"):
        info.family, info.title = "open", lic
        info.notes.append(f"licence id {lic!r} is not one the Hub lists; check the spelling")
    return info


def check_license(info: LicenseInfo, repo_id: str | None, *, public: bool, accept_terms: bool,
                  pushing: bool = True) -> list[str]:
    """Apply the licence rules; return warnings, raise QuantkitError when a push must not happen."""
    warnings: list[str] = []
    if not info.known:
        msg = (f"the base model's licence is unknown ({info.id or 'not stated in its card'}): check its terms, then "
               "pass --license ID (an SPDX/Hub licence id such as apache-2.0) to publish")
        if pushing:
            raise QuantkitError(msg)
        warnings.append(msg)
        return warnings
    warnings.extend(n for n in info.notes if info.family != "open" or "spelling" in n)
    name = (repo_id or "").split("/")[-1]
    if info.name_prefix and name and not name.startswith(info.name_prefix):
        warnings.append(f"the {info.title} requires names of derived models to begin with "
                        f"\"{info.name_prefix}\": {name!r} does not (e.g. use {info.name_prefix}-{name})")
    if info.noncommercial:
        warnings.insert(0, f"LICENCE WARNING: {info.title} does not allow commercial use"
                        + (" nor redistribution of derivatives" if info.no_derivatives else ""))
        if pushing and public and not accept_terms:
            raise QuantkitError(f"refusing to publish publicly: the base licence {info.title} is non-commercial"
                                + ("/no-derivatives" if info.no_derivatives else "")
                                + "; push --private, or pass --accept-license-terms if you have the right to")
    return warnings

# How strict a licence family is, for a model made of two licensed parts (base + adapter): the stricter governs.
STRICTNESS = {"open": 0, "llama": 1, "gemma": 1, "custom": 2, "unknown": 3, "noncommercial": 4}


def stricter_license(base: dict, adapter: dict) -> dict:
    """``{license, license_name, license_link}`` of whichever of two licences is stricter (base wins ties):
    a non-commercial adapter on a permissive base is non-commercial; an unlicensed adapter makes it unknown."""
    def rank(d):
        info = license_info(d)
        return STRICTNESS[info.family] + (1 if info.no_derivatives else 0)

    pick = adapter if rank(adapter) > rank(base) else base
    out = {k: pick.get(k) for k in ("license", "license_name", "license_link")}
    out["license"] = out["license"] or "unknown"  # stated, so a base card's licence cannot fill it in later
    return out
