"""Tools described in plain text, for chat templates that ignore `tools` and for base models."""


def format_tools_plain(functions: list[dict]) -> str:
    """A plain-text tool list, for tokenizers whose chat template ignores `tools`.

    One block per function: a signature line `name(param: type, ...)` with optional
    parameters marked `?`, the description, then one line per parameter:

        Available functions. Reply with a JSON list of calls, e.g. [{"name": "f", "arguments": {"x": 1}}].

        math.factorial(n: integer, exact?: boolean)
          Compute the factorial of a number.
          - n: The number. (required)
          - exact: Return an exact integer. Default true.
    """
    blocks = ['Available functions. Reply with a JSON list of calls, e.g. [{"name": "f", "arguments": {"x": 1}}].']
    for function in functions:
        parameters = function.get("parameters") or {}
        properties, required = parameters.get("properties") or {}, set(parameters.get("required") or ())
        signature = ", ".join(
            f"{param}{'' if param in required else '?'}: {_type_name(schema)}" for param, schema in properties.items()
        )
        lines = [f"{function['name']}({signature})"]
        if function.get("description"):
            lines.append(f"  {function['description']}")
        for param, schema in properties.items():
            line = f"  - {param}: {schema.get('description', '')}".rstrip()
            if "enum" in schema:
                line += f" One of: {', '.join(map(str, schema['enum']))}."
            lines.append(line + (" (required)" if param in required else ""))
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _type_name(schema: dict) -> str:
    kind = schema.get("type", "any")
    if isinstance(kind, list):
        return " | ".join(map(str, kind))
    items = schema.get("items")
    return f"{kind}[{_type_name(items)}]" if isinstance(items, dict) else str(kind)
