"""vLLM's tokenizer routes: POST /tokenize and POST /detokenize (behind the API key, like /v1).

/tokenize gives the token ids generation would use: a `prompt` as /v1/completions tokenizes it, or `messages`
through the chat template (with the same template options) as /v1/chat/completions does, so `count` is the
`usage.prompt_tokens` a request with that input reports; with `return_token_strs`, each token decoded alone. /detokenize is the inverse (special
tokens kept). Both run on the engine's tokenizer worker, never on the event loop, and need the engine
loaded (503 before). No generation and no steering happen here.
"""
from __future__ import annotations

from fastapi import APIRouter, Depends

from .openai_api import chat_ids, check_vocabulary, encoded
from .schemas import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from .state import ServingState


def tokenize_router(state: ServingState) -> APIRouter:
    router = APIRouter(dependencies=[Depends(state.check_api_key)])

    @router.post("/tokenize", response_model=TokenizeResponse)
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        engine, _ = state.admit(body.model)
        if body.messages is not None:
            ids = await chat_ids(body, engine)
        else:
            ids = await encoded(engine.encode(body.prompt), "prompt")
        strs = await engine.token_texts(ids) if body.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=engine.limits.max_model_len, tokens=ids,
                                token_strs=strs)

    @router.post("/detokenize", response_model=DetokenizeResponse)
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        engine, _ = state.admit(body.model)
        check_vocabulary(body.tokens, engine, "tokens")
        return DetokenizeResponse(prompt=await engine.decode(body.tokens, skip_special_tokens=False))

    return router
