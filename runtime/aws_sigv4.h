/*
 * The SigV4 signer of aws_sigv4.c, as the Lua functions migrun.aws exposes
 * (aws.c registers them). Internal to migrun; see aws_sigv4.c for the rules.
 */
#ifndef MIGRUN_AWS_SIGV4_H
#define MIGRUN_AWS_SIGV4_H

#include <lua.h>

/* aws.sign{ method=, url= | host=,path=,query=, headers=, body=, region=,
 *           service=, access_key=, secret_key=, session_token=, time=,
 *           signed_headers= } -> { headers=, authorization=, signature=,
 *           canonical_request=, string_to_sign=, ... }; raises on misuse */
int migrun_aws_sign(lua_State *L);
/* aws.sha256_hex(data) -> lower-case hex digest */
int migrun_aws_sha256_hex(lua_State *L);
/* aws.hmac_sha256_hex(key, data) -> lower-case hex MAC */
int migrun_aws_hmac_sha256_hex(lua_State *L);

#endif
