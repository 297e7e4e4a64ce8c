"""A local, faithful simulator of the image APIs imagebatch talks to, over real HTTP.

``Simulator`` serves APIFrame v2 (async jobs) at its root and OpenAI, AI/ML API, Omixa and
Oxen (synchronous) under ``/{provider}``, with the same fields, errors and billing as the
real services (APIFrame webhooks, Oxen's model schemas and OpenAI's Batch API included),
plus configurable latency, limits, image sizes, injected ``Faults``, ``BatchConfig``, and
``ProviderOverrides`` so that one provider of several can be slow, limited, out of credit or
down.
"""

from jobs.simulator.config import BatchConfig, Faults, ProviderOverrides, SimulatorConfig
from jobs.simulator.server import Simulator

__all__ = ["BatchConfig", "Faults", "ProviderOverrides", "Simulator", "SimulatorConfig"]
