"""Benchmarks: ``make bench`` runs them on this machine and prints one table.

Each figure is printed beside a reference measured in the same run (raw argon2 speed, a bare aiohttp
handler, the broker's own round trip), so ratios hold on noisy machines.
"""
