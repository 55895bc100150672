"""RBAC for the API stand-in: who may do what, from the Roles and bindings a chart renders.

The evaluation follows Kubernetes' RBAC authorizer
(https://kubernetes.io/docs/reference/access-authn-authz/rbac/,
``plugin/pkg/auth/authorizer/rbac``): a request is allowed when one rule of a role bound to
the user allows it; a rule matches when its ``verbs``, ``apiGroups`` and ``resources``
(``plural`` or ``plural/subresource``) contain the request's (or ``*``), and its
``resourceNames``, if any, the object's name. A ClusterRole bound by a
ClusterRoleBinding applies in every namespace and to cluster-scoped resources; a Role, or a
ClusterRole bound by a RoleBinding, only in that binding's namespace. Nothing is allowed
by default except discovery (``/api``, ``/apis``, ``/version``: the
``system:discovery`` role every authenticated user has). Non-resource URLs other than
those, aggregation and impersonation are not modelled.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional


def _has(values: Iterable[str], want: str) -> bool:
    values = list(values or [])
    return "*" in values or want in values


@dataclass
class Authorizer:
    """The permissions of one user (a ServiceAccount).

    Attributes:
        user: the user name errors give, ``system:serviceaccount:<namespace>:<name>``.
        cluster_rules: rules that apply everywhere (ClusterRoleBindings).
        namespace_rules: namespace -> rules that apply there (RoleBindings).
    """

    user: str
    cluster_rules: list[dict] = field(default_factory=list)
    namespace_rules: dict[str, list[dict]] = field(default_factory=dict)

    @classmethod
    def for_service_account(cls, manifests: list[dict], namespace: str, name: str) -> "Authorizer":
        """The permissions ``manifests`` (rendered Roles, ClusterRoles and their bindings)
        give ServiceAccount ``namespace/name``."""
        roles = {(m["kind"], (m["metadata"].get("namespace") if m["kind"] == "Role" else None), m["metadata"]["name"]):
                 m.get("rules") or [] for m in manifests if m.get("kind") in ("Role", "ClusterRole")}
        auth = cls(f"system:serviceaccount:{namespace}:{name}")
        for m in manifests:
            if m.get("kind") not in ("RoleBinding", "ClusterRoleBinding"):
                continue
            if not any(s.get("kind") == "ServiceAccount" and s.get("name") == name
                       and s.get("namespace", m["metadata"].get("namespace")) == namespace
                       for s in m.get("subjects") or []):
                continue
            ref = m["roleRef"]
            bind_ns = m["metadata"].get("namespace") if m["kind"] == "RoleBinding" else None
            rules = roles.get((ref["kind"], bind_ns if ref["kind"] == "Role" else None, ref["name"]), [])
            if bind_ns is None:
                auth.cluster_rules += rules
            else:
                auth.namespace_rules.setdefault(bind_ns, []).extend(rules)
        return auth

    def rules_in(self, namespace: Optional[str]) -> list[dict]:
        """The rules that apply to a request in ``namespace`` (None: cluster-scoped)."""
        return self.cluster_rules + (self.namespace_rules.get(namespace, []) if namespace else [])

    def allows(self, verb: str, group: str, resource: str, subresource: Optional[str] = None,
               namespace: Optional[str] = None, name: Optional[str] = None) -> bool:
        """Whether one rule allows ``verb`` on ``group``/``resource``[/``subresource``]
        (object ``name`` in ``namespace``; None for cluster-scoped resources, or for a
        list or watch across all namespaces, which only cluster-wide rules allow)."""
        target = f"{resource}/{subresource}" if subresource else resource
        for rule in self.rules_in(namespace):
            if (_has(rule.get("verbs"), verb) and _has(rule.get("apiGroups"), group)
                    and _has(rule.get("resources"), target)
                    and (not rule.get("resourceNames") or (name is not None and name in rule["resourceNames"]))):
                return True
        return False

    def forbidden(self, verb: str, group: str, resource: str, subresource: Optional[str] = None,
                  namespace: Optional[str] = None, name: Optional[str] = None) -> str:
        """The real server's message for a denied request."""
        target = f"{resource}/{subresource}" if subresource else resource
        what = f'{target}{"." + group if group else ""}' + (f' "{name}"' if name else "")
        scope = f' in the namespace "{namespace}"' if namespace else " at the cluster scope"
        return (f'{what} is forbidden: User "{self.user}" cannot {verb} resource "{target}" in API group '
                f'"{group}"{scope}')

    def covers(self, rules: list[dict], namespace: Optional[str]) -> Optional[str]:
        """RBAC's escalation check for creating or updating a Role or ClusterRole: every
        (group, resource, verb) the ``rules`` grant must be allowed to this user in
        ``namespace``; the first one that is not, as ``"verb group/resource"``, else None.
        (The ``escalate`` verb, which lifts the check, is not modelled.)"""
        for rule in rules:
            for group in rule.get("apiGroups") or []:
                for res in rule.get("resources") or []:
                    resource, _, sub = res.partition("/")
                    for verb in rule.get("verbs") or []:
                        if not self.allows(verb, group, resource, sub or None, namespace,
                                           (rule.get("resourceNames") or [None])[0]):
                            return f"{verb} {group or 'core'}/{res}"
        return None
