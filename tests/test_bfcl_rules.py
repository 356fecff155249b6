"""Where BFCL's AST checker is stricter than a loose reading, the tooluse checker follows it."""

from opdplus.tasks.tooluse import check_calls


def one_function(**properties):
    return [{"name": "f", "parameters": {"type": "dict", "properties": properties, "required": list(properties)}}]


def test_newline_tab_and_nbsp_inside_strings_are_not_ignored():
    functions = one_function(city={"type": "string"})
    ground_truth = [{"f": {"city": ["New York, NY"]}}]
    assert check_calls('f(city="new york,NY")', functions, ground_truth)  # spaces, commas and case: ignored
    for spaced in ("New\nYork, NY", "New\tYork, NY", "New\u00a0York, NY"):
        assert not check_calls(f"f(city={spaced!r})", functions, ground_truth), repr(spaced)


def test_a_tuple_is_accepted_only_for_a_tuple_parameter():
    ground_truth = [{"f": {"pair": [[1, 2]]}}]
    array = one_function(pair={"type": "array", "items": {"type": "integer"}})
    tuple_ = one_function(pair={"type": "tuple", "items": {"type": "integer"}})
    assert check_calls("f(pair=[1, 2])", array, ground_truth)
    assert not check_calls("f(pair=(1, 2))", array, ground_truth)
    assert check_calls("f(pair=(1, 2))", tuple_, ground_truth)
    assert check_calls("f(pair=[1, 2])", tuple_, ground_truth)


def test_an_int_stands_for_a_float_only_at_the_top_level():
    functions = one_function(scale={"type": "float"}, weights={"type": "array", "items": {"type": "float"}})
    ground_truth = [{"f": {"scale": [2.0], "weights": [[1.0, 0.5]]}}]
    assert check_calls("f(scale=2, weights=[1.0, 0.5])", functions, ground_truth)
    assert not check_calls("f(scale=2.0, weights=[1, 0.5])", functions, ground_truth)


def test_strings_below_a_dict_value_keep_their_case():
    functions = one_function(hands={"type": "dict"})
    ground_truth = [{"f": {"hands": [{"Alex": [["A of spades"]], "seat": ["North"]}]}}]
    assert check_calls("f(hands={'Alex': ['A of spades'], 'seat': 'north'})", functions, ground_truth)
    assert not check_calls("f(hands={'Alex': ['a of spades'], 'seat': 'North'})", functions, ground_truth)
