"""REST routes for issue 8: certificates, account keys, agent revocation, remote-login users.

POST   /certificates                                   add (pfx + password, or cer)
GET    /certificates                                   list
GET    /certificates/{thumbprintAlgorithm}-{thumbprint}
DELETE /certificates/{thumbprintAlgorithm}-{thumbprint}  409 CertificateInUse while a pool references it
POST   /account/regeneratekeys {keyName: primary|secondary}  -> {accountName, primary, secondary}
POST   /agents/{agentId}/revoke                         drop the agent's credential, close its link (4003)
POST   /agenttokens {expiresIn?, singleUse?}            a join token that expires / enrols one agent
GET    /agenttokens                                     list (never the secrets)
DELETE /agenttokens/{id}                                revoke (agents it enrolled keep their credential)
POST   /pools/{pool}/tvms/{tvm}/users                   {name, sshPublicKey, expiryTime, isAdmin}
GET    /pools/{pool}/tvms/{tvm}/users
DELETE /pools/{pool}/tvms/{tvm}/users/{user}
GET    /pools/{pool}/tvms/{tvm}/remoteloginsettings     -> {remoteLoginIpAddress, remoteLoginPort}
"""

from __future__ import annotations

import base64
from typing import Any

import msgspec

from coordinator.common import models as m
from coordinator.common.errors import ApiError, bad_request
from coordinator.common.timeutil import parse_duration, rfc3339
from coordinator.core import CertRec
from coordinator.runtime.agentauth import AgentToken as AgentTokenRec

from . import paging
from .dispatch import Response, RouteAdder, RouteGroup, _decode, _json_response

MAX_TOKEN_LIFETIME_S = 365 * 86400


def _token_view(rec: AgentTokenRec) -> m.AgentToken:
    return m.AgentToken(
        id=rec.id,
        creation_time=rfc3339(rec.created) or "",
        expiry_time=rfc3339(rec.expires) if rec.expires else None,
        single_use=rec.single_use,
        used_by=rec.used_by,
    )


def cert_view(core: Any, rec: CertRec) -> m.Certificate:
    return m.Certificate(
        thumbprint=rec.thumbprint,
        thumbprint_algorithm=rec.thumbprint_algorithm,
        state=rec.state,
        state_transition_time=rfc3339(rec.state_time) or "",
        certificate_format=rec.certificate_format,
        subject=rec.subject,
        expiry=rfc3339(rec.not_after) or "",
        has_private_key=rec.has_private_key,
        public_data=base64.b64encode(rec.public_der).decode(),
        pools=core.certificate_users(rec.thumbprint),
    )


class CertRoutes(RouteGroup):
    def register(self, r: RouteAdder) -> None:
        r("POST", r"/certificates", self.add_certificate)
        r("GET", r"/certificates", self.list_certificates)
        r("GET", r"/certificates/(?P<name>[^/]+)", self.get_certificate)
        r("DELETE", r"/certificates/(?P<name>[^/]+)", self.delete_certificate)
        r("POST", r"/account/regeneratekeys", self.regenerate_keys)
        r("POST", r"/agents/(?P<agent>[^/]+)/revoke", self.revoke_agent)
        r("POST", r"/agenttokens", self.create_agent_token)
        r("GET", r"/agenttokens", self.list_agent_tokens)
        r("DELETE", r"/agenttokens/(?P<token_id>[^/]+)", self.revoke_agent_token)
        r("POST", r"/pools/(?P<pool>[^/]+)/tvms/(?P<tvm>[^/]+)/users", self.add_user)
        r("GET", r"/pools/(?P<pool>[^/]+)/tvms/(?P<tvm>[^/]+)/users", self.list_users)
        r(
            "DELETE",
            r"/pools/(?P<pool>[^/]+)/tvms/(?P<tvm>[^/]+)/users/(?P<user>[^/]+)",
            self.delete_user,
        )
        r(
            "GET",
            r"/pools/(?P<pool>[^/]+)/tvms/(?P<tvm>[^/]+)/remoteloginsettings",
            self.remote_login,
        )

    # ------------------------------------------------------------------ certificates

    async def add_certificate(self, body: bytes, **_: Any) -> Response:
        req = _decode(body, m.CertificateAdd)
        rec = await self.svc.execute(self.core.add_certificate, req)
        return _json_response(201, cert_view(self.core, rec))

    async def list_certificates(self, query: dict[str, str], **_: Any) -> Response:
        recs = sorted(self.core.certificates.values(), key=lambda c: c.thumbprint)
        return _json_response(
            200,
            paging.listing(recs, query, lambda c: c.thumbprint, lambda c: cert_view(self.core, c)),
        )

    async def get_certificate(self, name: str, **_: Any) -> Response:
        return _json_response(200, cert_view(self.core, self.core.get_certificate(name)))

    async def delete_certificate(self, name: str, **_: Any) -> Response:
        await self.svc.execute(self.core.delete_certificate, name)
        return Response(202)

    # ------------------------------------------------------------------ keys and agents

    async def regenerate_keys(self, body: bytes, **_: Any) -> Response:
        req = _decode(body, m.RegenerateKey)
        if req.key_name not in ("primary", "secondary"):
            raise bad_request(
                "InvalidPropertyValue", "keyName must be 'primary' or 'secondary'", field="keyName"
            )
        self.svc.regenerate_key(req.key_name)
        return _json_response(
            200,
            m.AccountKeys(
                account_name=self.svc.account, primary=self.svc.keys[0], secondary=self.svc.keys[1]
            ),
        )

    async def revoke_agent(self, agent: str, **_: Any) -> Response:
        if not self.svc.revoke_agent(agent):
            raise ApiError(
                404,
                "AgentNotFound",
                f"no agent {agent!r} has registered with this coordinator",
                name=agent,
            )
        await self.svc.execute(self.core.forget_agent, agent)
        await self.svc.journal.barrier().wait()  # the revocation (a meta row) is durable
        return Response(202)

    async def create_agent_token(self, body: bytes, **_: Any) -> Response:
        req = _decode(body, m.AgentTokenAdd)
        if not isinstance(req.single_use, bool):
            raise bad_request(
                "InvalidPropertyValue", "singleUse must be true or false", field="singleUse"
            )
        expires_in = (
            parse_duration(req.expires_in, "expiresIn") if req.expires_in is not None else 0.0
        )
        if req.expires_in is not None and not 0 < expires_in <= MAX_TOKEN_LIFETIME_S:
            raise bad_request(
                "InvalidPropertyValue",
                "expiresIn must be more than 0 and at most 365 days",
                field="expiresIn",
            )
        rec, token = self.svc.auth.create_token(self.core.clock(), expires_in, req.single_use)
        await self.svc.journal.barrier().wait()  # usable (durable) before it is shown
        return _json_response(201, msgspec.structs.replace(_token_view(rec), token=token))

    async def list_agent_tokens(self, **_: Any) -> Response:
        return _json_response(200, {"value": [_token_view(t) for t in self.svc.auth.tokens()]})

    async def revoke_agent_token(self, token_id: str, **_: Any) -> Response:
        if not self.svc.auth.revoke_token(token_id):
            raise ApiError(404, "AgentTokenNotFound", f"no agent token {token_id!r}", name=token_id)
        await self.svc.journal.barrier().wait()
        return Response(200)

    # ------------------------------------------------------------------ remote login

    async def add_user(self, pool: str, tvm: str, body: bytes, **_: Any) -> Response:
        req = _decode(body, m.TvmUserAdd)
        user = await self.svc.execute(self.core.add_tvm_user, pool, tvm, req)
        return _json_response(201, _user_view(user))

    async def list_users(self, pool: str, tvm: str, query: dict[str, str], **_: Any) -> Response:
        t = self.core.get_tvm(pool, tvm)
        return _json_response(
            200, paging.listing(list(t.rec.users), query, lambda u: u.name, _user_view)
        )

    async def delete_user(self, pool: str, tvm: str, user: str, **_: Any) -> Response:
        await self.svc.execute(self.core.delete_tvm_user, pool, tvm, user)
        return Response(200)

    async def remote_login(self, pool: str, tvm: str, **_: Any) -> Response:
        t = self.core.get_tvm(pool, tvm)
        return _json_response(
            200,
            m.RemoteLoginSettings(
                remote_login_ip_address=t.rec.ip or "127.0.0.1", remote_login_port=22
            ),
        )


def _user_view(u: Any) -> m.TvmUser:
    return m.TvmUser(
        name=u.name,
        expiry_time=rfc3339(u.expiry) or "",
        ssh_public_key=u.ssh_public_key,
        is_admin=u.is_admin,
    )
