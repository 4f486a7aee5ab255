"""Unit tests of platform selection (mirror.core.platforms): --platform parsing and which
children of an index an image needs."""

import pytest

from mirror.core.platforms import Platform, PlatformChoice, PlatformError, host_platform, parse_platforms, select_children


def child(os_name, arch, variant=None, digest="x"):
    platform = {"os": os_name, "architecture": arch}
    if variant:
        platform["variant"] = variant
    return {"mediaType": "m", "digest": digest, "size": 1, "platform": platform}


INDEX = [
    child("linux", "amd64", digest="amd64"),
    child("linux", "arm64", "v8", digest="arm64"),
    child("linux", "arm", "v6", digest="armv6"),
    child("linux", "arm", "v7", digest="armv7"),
    child("windows", "amd64", digest="win"),
    child("unknown", "unknown", digest="attestation"),
    {"mediaType": "m", "digest": "noplatform", "size": 1},
]


def digests(children):
    return [c["digest"] for c in children]


def test_parse_all_and_lists():
    """`all` means every child; a list is parsed, lower-cased and de-duplicated."""
    assert parse_platforms("all") == PlatformChoice(None)
    assert parse_platforms(" ALL ") == PlatformChoice(None)
    choice = parse_platforms("linux/amd64, Linux/ARM/v7,linux/amd64")
    assert choice.platforms == (Platform("linux", "amd64"), Platform("linux", "arm", "v7"))
    assert str(choice) == "linux/amd64,linux/arm/v7"


@pytest.mark.parametrize("text", ["linux", "linux/", "/amd64", "linux/amd64/v8/x", "linux/am d64", "", "linux/amd64,"])
def test_malformed_platforms_are_refused(text):
    """Anything but os/arch[/variant] or all is a PlatformError naming it."""
    with pytest.raises(PlatformError) as info:
        parse_platforms(text)
    assert "expected os/arch[/variant]" in str(info.value)


def test_host_platform_uses_goarch_names():
    """uname machine names become the GOARCH names indexes use."""
    assert host_platform("x86_64") == Platform("linux", "amd64")
    assert host_platform("aarch64") == Platform("linux", "arm64")
    assert host_platform("armv7l") == Platform("linux", "arm", "v7")
    assert host_platform("riscv64") == Platform("linux", "riscv64")
    assert host_platform().os == "linux"


def test_select_one_platform():
    """One platform takes its child only; attestations and platform-less children are left."""
    assert digests(select_children(INDEX, parse_platforms("linux/amd64"))) == ["amd64"]


def test_variants():
    """No variant takes every variant; a variant only that one; arm64 means arm64/v8."""
    assert digests(select_children(INDEX, parse_platforms("linux/arm"))) == ["armv6", "armv7"]
    assert digests(select_children(INDEX, parse_platforms("linux/arm/v7"))) == ["armv7"]
    assert digests(select_children(INDEX, parse_platforms("linux/arm64"))) == ["arm64"]
    assert digests(select_children(INDEX, parse_platforms("linux/arm64/v8"))) == ["arm64"]


def test_several_platforms_keep_index_order():
    """Several platforms: their children, in the index's order, each once."""
    chosen = select_children(INDEX, parse_platforms("windows/amd64,linux/amd64"))
    assert digests(chosen) == ["amd64", "win"]
    overlapping = select_children(INDEX, parse_platforms("linux/arm,linux/arm/v7"))
    assert digests(overlapping) == ["armv6", "armv7"]


def test_all_takes_every_child():
    """`all` takes every child, attestations and platform-less ones included."""
    assert digests(select_children(INDEX, PlatformChoice(None))) == digests(INDEX)


def test_missing_platform_names_what_the_index_has():
    """A wanted platform with no child fails, listing the platforms there are."""
    with pytest.raises(PlatformError) as info:
        select_children(INDEX, parse_platforms("linux/s390x"))
    message = str(info.value)
    assert "no manifest for linux/s390x" in message
    assert "linux/amd64, linux/arm/v6, linux/arm/v7, linux/arm64/v8, windows/amd64" in message
    assert "unknown" not in message


def test_platform_accessor_for_other_descriptor_kinds():
    """Descriptors other than JSON objects work through an accessor."""
    items = [("a", {"os": "linux", "architecture": "amd64"}), ("b", {"os": "linux", "architecture": "arm64"})]
    assert select_children(items, parse_platforms("linux/arm64"), lambda item: item[1]) == [items[1]]
