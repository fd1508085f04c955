"""--weights parsing: ordered mapping, normalisation, and one clear error per malformed input."""

import pytest

from xmerge.errors import XmergeError
from xmerge.merge.weights import normalized, parse_weights


def test_parses_domains_and_expert_ids_in_order():
    weights = parse_weights("math=0.35, code=0.35,stem=0.2,17=0.1")
    assert list(weights.items()) == [("math", 0.35), ("code", 0.35), ("stem", 0.2), ("17", 0.1)]


def test_normalize_divides_by_the_sum():
    weights = parse_weights("math=3,code=1", normalize=True)
    assert weights == {"math": 0.75, "code": 0.25}
    assert sum(parse_weights("a=0.1,b=0.2,c=0.3", normalize=True).values()) == pytest.approx(1.0, abs=1e-15)


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("math=abc", "'abc', not a number"),
        ("math=", "no weight after '='"),
        ("=0.5", "no domain or expert id"),
        ("math", "no '='"),
        ("", "empty"),
        ("math=0.5,math=0.2", "'math' appears twice"),
        ("math=-0.1,code=1", "negative"),
        ("math=0,code=0", "all weights are zero"),
        ("math=nan", "finite"),
        ("math=inf", "finite"),
        ("ma th=1", "not a domain name or expert id"),
    ],
)
def test_malformed_weights_raise_a_clear_error(text, fragment):
    with pytest.raises(XmergeError, match=fragment):
        parse_weights(text)


def test_allow_negative_permits_negative_but_not_all_zero():
    assert parse_weights("math=-0.5,code=1.5", allow_negative=True) == {"math": -0.5, "code": 1.5}
    with pytest.raises(XmergeError, match="all weights are zero"):
        parse_weights("math=0,code=0", allow_negative=True)


def test_normalize_refuses_a_non_positive_sum():
    with pytest.raises(XmergeError, match="cannot normalize"):
        parse_weights("math=-1,code=1", allow_negative=True, normalize=True)
    with pytest.raises(XmergeError, match="cannot normalize"):
        normalized({"math": -2.0, "code": 1.0})
