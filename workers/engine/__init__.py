"""The generation engine: continuous batching of requests with their own placements over one model."""

from workers.engine.async_engine import AsyncEngine, RequestStream
from workers.engine.config import EngineConfig
from workers.engine.engine import Engine
from workers.engine.request import Request, TokenEvent
from workers.engine.seam import ModelFacts, ServingEngine
from workers.engine.stats import EngineStats, SequenceStats, StepRecord

__all__ = ["AsyncEngine", "Engine", "EngineConfig", "EngineStats", "ModelFacts", "Request", "RequestStream",
           "SequenceStats", "ServingEngine", "StepRecord", "TokenEvent"]
