"""The kernel adapter: what the applier writes and reads back, and the only code that speaks netlink or nft.

backend.py the interface (and the simulated kernel), netlink_writer.py + netlink_batch.py + ipvs_wire.py +
ipset_wire.py the netlink encoders, kernel_read.py the decoders (``kipvs ipvs``), rules.py +
endpoint_mark_rules.py the nftables table ``inet kipvs``.
"""
