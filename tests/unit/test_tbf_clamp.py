"""containerd sends "no burst limit" as 2^32-1 bits with every bandwidth annotation.

The reference accepts it (its buffer field wraps around); pycni clamps the
burst to the most a tbf buffer holds at that rate and says so, instead of
refusing every annotated pod.
"""

from cni_plugins.bandwidth.config import parse_bandwidth
from cni_plugins.bandwidth.shaping import token_buckets
from cni_plugins.kernel.tc import U32_MAX, TokenBucket

CONTAINERD = {
    "IngressRate": 10_000_000,
    "IngressBurst": 4294967295,
    "EgressRate": 20_000_000,
    "EgressBurst": 4294967295,
}


def test_burst_too_long_for_the_buffer_is_clamped_not_refused():
    bucket = TokenBucket.from_bits(10_000_000, 4294967295, 25)
    assert bucket.clamped and bucket.buffer <= U32_MAX
    assert 0 < bucket.burst_bytes < 4294967295 // 8
    assert bucket.limit <= U32_MAX


def test_an_ordinary_burst_is_not_clamped():
    bucket = TokenBucket.from_bits(10_000_000, 80_000, 25)
    assert not bucket.clamped and bucket.burst_bytes == 10_000


def test_containerd_annotation_values_give_buckets_and_a_warning():
    bw = parse_bandwidth({"runtimeConfig": {"bandwidth": {k[0].lower() + k[1:]: v for k, v in CONTAINERD.items()}}})
    warnings: list[str] = []
    ingress, egress = token_buckets(bw, warnings.append)
    assert ingress.rate == 1_250_000 and egress.rate == 2_500_000
    # 2^32-1 bits take 429 s at 10 Mbit/s (more than the buffer field's ~275 s): clamped;
    # at 20 Mbit/s they take 215 s, which fits.
    assert len(warnings) == 1 and "ingressBurst" in warnings[0] and "largest burst" in warnings[0]
    assert ingress.clamped and not egress.clamped
