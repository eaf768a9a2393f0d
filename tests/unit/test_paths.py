import pytest

from protocol.paths import MAX_PATH_LENGTH, validate_relative_path


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("file.txt", "file.txt"),
        ("a/b/c.bin", "a/b/c.bin"),
        ("a//b/./c", "a/b/c"),
        ("./a/", "a"),
        ("dir\\file.txt", "dir/file.txt"),
        ("a/..b/c..", "a/..b/c.."),  # dots inside names are fine
        ("weird name ü.txt", "weird name ü.txt"),
    ],
)
def test_accepts_and_normalises(raw: str, expected: str) -> None:
    assert validate_relative_path(raw) == expected


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ("", "empty"),
        (".", "names no file"),
        ("./", "names no file"),
        ("/etc/passwd", "absolute"),
        ("\\etc\\passwd", "absolute"),
        ("C:\\Windows\\x", "drive letter"),
        ("c:x", "drive letter"),
        ("..", "'..'"),
        ("../x", "'..'"),
        ("a/../../x", "'..'"),
        ("a\\..\\..\\x", "'..'"),
        ("a/b/..", "'..'"),
        ("a\x00b", "NUL"),
        ("x" * (MAX_PATH_LENGTH + 1), "limit is 1024"),
        ("a/" + "y" * 256, "longer than 255"),
    ],
)
def test_rejects_with_clear_message(raw: str, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        validate_relative_path(raw)
    assert fragment in str(info.value)


def test_rejects_non_string() -> None:
    with pytest.raises(ValueError, match="must be a string"):
        validate_relative_path(b"abc")  # type: ignore[arg-type]


def test_exact_limit_is_allowed() -> None:
    p = "/".join(["a" * 200] * 5) + "/" + "b" * 19
    assert len(p) == MAX_PATH_LENGTH
    assert validate_relative_path(p) == p
