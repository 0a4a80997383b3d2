"""The CloudFormation stacks as CloudFormation would see them for one set of parameter values:
conditions evaluated (Fn::Equals, Fn::And, Fn::Or, Fn::Not, Condition), resources and outputs
whose condition is false removed, the chosen branch of each Fn::If kept and an AWS::NoValue
branch dropped from its list. Shared by test_images.py (the shape of each mode and AgentCount)
and test_first_boot.py (the user data the launch templates carry).

Only the conditions in `conditions_to_apply` are applied to the template (by default every
one that depends on the parameters given), so the other Fn::If branches (secret store, DNS
mode, ...) stay as they are for the tests that read them.
"""

import re

from cfnlint.decode import decode

NO_VALUE = {"Ref": "AWS::NoValue"}


def load(path):
    template, problems = decode(str(path))
    assert not problems, f"{path.name} does not parse: {problems}"
    return template


def parameter_values(template, given):
    values = {name: str(p["Default"]) for name, p in template["Parameters"].items() if "Default" in p}
    values.update({k: str(v) for k, v in given.items()})
    return values


def evaluate_conditions(template, values):
    definitions = template.get("Conditions", {})
    done = {}

    def value(node):
        if isinstance(node, dict) and set(node) == {"Ref"}:
            assert node["Ref"] in values, f"condition reads {node['Ref']}, which has no value here"
            return values[node["Ref"]]
        assert isinstance(node, (str, int)), f"unsupported operand {node}"
        return str(node)

    def truth(node):
        (function, args), = node.items()
        if function == "Fn::Equals":
            return value(args[0]) == value(args[1])
        if function == "Fn::And":
            return all(truth(a) for a in args)
        if function == "Fn::Or":
            return any(truth(a) for a in args)
        if function == "Fn::Not":
            return not truth(args[0])
        if function == "Condition":
            return named(args)
        raise AssertionError(f"unsupported condition function {function}")

    def named(name):
        if name not in done:
            done[name] = truth(definitions[name])
        return done[name]

    return {name: named(name) for name in definitions}


def depends_on(template, condition, parameters):
    """Whether `condition` reads any of `parameters`, directly or through other conditions."""
    definitions = template.get("Conditions", {})

    def reads(node):
        if isinstance(node, dict):
            if set(node) == {"Ref"}:
                return node["Ref"] in parameters
            if set(node) == {"Condition"}:
                return reads(definitions[node["Condition"]])
            return any(reads(v) for v in node.values())
        if isinstance(node, list):
            return any(reads(v) for v in node)
        return False

    return reads(definitions[condition])


def choose(node, conditions):
    """`node` with every Fn::If on one of `conditions` replaced by its chosen branch, and list
    items that chose AWS::NoValue removed."""
    if isinstance(node, dict):
        if set(node) == {"Fn::If"} and node["Fn::If"][0] in conditions:
            name, yes, no = node["Fn::If"]
            return choose(yes if conditions[name] else no, conditions)
        chosen = {k: choose(v, conditions) for k, v in node.items()}
        return {k: v for k, v in chosen.items() if v != NO_VALUE}
    if isinstance(node, list):
        chosen = [choose(item, conditions) for item in node]
        return [item for item in chosen if item != NO_VALUE]
    return node


def stack_for(path, **given):
    """The stack at `path` with the parameters `given` (the rest at their defaults): the
    conditions that depend on the given parameters applied."""
    template = load(path)
    values = parameter_values(template, given)
    every = evaluate_conditions(template, values)
    applied = {name: truth for name, truth in every.items() if depends_on(template, name, set(given))}
    for section in ("Resources", "Outputs"):
        template[section] = {
            name: choose(res, applied) for name, res in template[section].items()
            if applied.get(res.get("Condition"), True)
        }
    template["Conditions"] = {name: d for name, d in template.get("Conditions", {}).items() if name not in applied}
    return template, values, every


def resolve(node, values, conditions):
    """An intrinsic-function value, computed: Ref from `values` (parameters, pseudo parameters and
    stand-in physical IDs of resources), Fn::If, Fn::Sub (with or without a variable map),
    Fn::Join, Fn::Split, Fn::Select."""
    if isinstance(node, list):
        items = [resolve(item, values, conditions) for item in node]
        return [item for item in items if item is not NO_VALUE]
    if not isinstance(node, dict):
        return node
    if set(node) == {"Ref"}:
        if node["Ref"] == "AWS::NoValue":
            return NO_VALUE
        assert node["Ref"] in values, f"no value for {node['Ref']}"
        return values[node["Ref"]]
    if set(node) == {"Fn::If"}:
        name, yes, no = node["Fn::If"]
        return resolve(yes if conditions[name] else no, values, conditions)
    if set(node) == {"Fn::Sub"}:
        text, variables = (node["Fn::Sub"], {}) if isinstance(node["Fn::Sub"], str) else node["Fn::Sub"]
        local = dict(values)
        local.update({k: resolve(v, values, conditions) for k, v in variables.items()})

        def substitute(match):
            name = match.group(1)
            assert name in local, f"no value for placeholder {name}"
            return str(local[name])

        return re.sub(r"\$\{([^}!]+)\}", substitute, text)
    if set(node) == {"Fn::Join"}:
        separator, items = node["Fn::Join"]
        return separator.join(str(i) for i in resolve(items, values, conditions))
    if set(node) == {"Fn::Split"}:
        separator, text = node["Fn::Split"]
        return resolve(text, values, conditions).split(separator)
    if set(node) == {"Fn::Select"}:
        index, items = node["Fn::Select"]
        return resolve(items, values, conditions)[int(index)]
    return {k: resolve(v, values, conditions) for k, v in node.items()}


def rule_failures(template, values):
    """The AssertDescription of every assertion in the stack's Rules that fails for `values`
    (a rule applies where its RuleCondition holds), as CloudFormation checks them before it
    creates or changes anything."""
    failed = []
    for name, rule in template.get("Rules", {}).items():
        checks = {"applies": rule.get("RuleCondition", {"Fn::Equals": ["x", "x"]})}
        checks.update({str(i): a["Assert"] for i, a in enumerate(rule["Assertions"])})
        truth = evaluate_conditions({"Conditions": checks}, values)
        if truth["applies"]:
            failed += [a["AssertDescription"] for i, a in enumerate(rule["Assertions"]) if not truth[str(i)]]
    return failed
